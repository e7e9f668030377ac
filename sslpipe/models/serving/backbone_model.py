"""MLflow models-from-code entry: defines the registered backbone pyfunc without pickling."""

import mlflow

from sslpipe.models.serving.embedder import BackboneEmbedder

mlflow.models.set_model(BackboneEmbedder())
