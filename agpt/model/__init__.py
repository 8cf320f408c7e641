"""The µGPT model (SPEC §7): configuration, parameters, and the forward/backward over rows."""
