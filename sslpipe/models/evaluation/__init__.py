"""Evaluating a classifier, in parts that the evaluate step (:mod:`sslpipe.steps.evaluate`)
composes:

- :mod:`~sslpipe.models.evaluation.metrics`: test metrics from scikit-learn and the quality gate
  (pure);
- :mod:`~sslpipe.models.evaluation.report`: the Markdown report, the confusion-matrix figure and the
  baselines it compares with (files only: no registry, no MLflow);
- :mod:`~sslpipe.models.evaluation.registration`: registering the classifier with its lineage tags
  and
  the ``candidate`` alias (the MLflow registry).
"""
