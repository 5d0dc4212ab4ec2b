"""Memory: per-agent notes and conversation history, with a RAM tier evicted by LRU-K."""
