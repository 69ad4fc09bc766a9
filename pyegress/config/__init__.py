"""Configuration: gost node URLs and config files, parsed once into frozen values."""
