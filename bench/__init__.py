"""The clipia-proxy benchmark: direct to the emulator vs through the gateway (and LiteLLM)."""
