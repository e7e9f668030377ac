"""The models: MoCo v2, the classifier, evaluation, the registry and serving, and the
training scaffold both training steps share (:mod:`sslpipe.models.training`).
"""
