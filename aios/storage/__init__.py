"""Storage: the database under memory and storage, and the versioned per-agent file tree."""
