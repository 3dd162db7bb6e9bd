"""Worker processes, each with its own privileges: proxy (host netns), netns
(sandbox user+network namespace), jail (bwrap + seccomp around the command)."""
