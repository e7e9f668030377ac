"""MLflow models-from-code entry: defines the registered classifier pyfunc without pickling."""

import mlflow

from sslpipe.models.serving.classifier import ImageClassifierModel

mlflow.models.set_model(ImageClassifierModel())
