"""Models as downstream services load them (MLflow pyfunc)."""
