"""Netns worker: pasta + nft + pyroute2; the sandbox network namespace with one door."""
