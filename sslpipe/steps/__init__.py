"""The pipeline steps as library functions: components are thin entry points around these."""
