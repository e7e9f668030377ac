"""What both training steps share: the distributed session, experiment tracking and the
retraining guard.
"""
