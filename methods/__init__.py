"""First-party compression methods, each registered through tokenbench's own entry points."""
