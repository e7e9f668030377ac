"""sslpipe: self-supervised learning pipeline for image catalogs."""
