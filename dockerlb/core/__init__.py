"""The pure core: labels -> desired model -> plan, and how they are shown.

No Docker, no kernel, no sockets (import-linter keeps it so)."""
