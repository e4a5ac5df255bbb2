"""Adapters that let serving frameworks use kvstore (vLLM: `kvstore.integrations.vllm`)."""
