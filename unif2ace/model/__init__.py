"""The thin UniF²ace model layer (see the model-layer issue); built on unif2ace.kernels."""
