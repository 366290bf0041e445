"""Model zoo internals: configs, layer builders, losses and helpers (public via hkpipe.models)."""
