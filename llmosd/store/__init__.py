"""The model store: content-addressed blobs, manifests, uploads."""
