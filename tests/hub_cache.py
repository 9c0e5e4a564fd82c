"""A pre-populated local Hugging Face cache, written the way huggingface_hub stores downloads.

``$HF_HOME/hub/models--Owner--Name/``: ``blobs/<sha256>`` holds each file's bytes,
``snapshots/<commit>/<path>`` are relative symlinks to the blobs, ``refs/main`` holds the commit.
Plain code on purpose (no huggingface_hub calls), so the resolver under test reads a layout it did
not write. No network is involved: the tests run with ``HF_HUB_OFFLINE=1``.
"""
from __future__ import annotations

import hashlib
import os


def add_to_hub_cache(hf_home: str, repo_id: str, src_dir: str, commit: str | None = None) -> str:
    """Copy ``src_dir`` into the cache as ``repo_id`` at ``commit`` (refs/main); return the snapshot dir."""
    owner, name = repo_id.split("/")
    repo = os.path.join(hf_home, "hub", f"models--{owner}--{name}")
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for root, _, files in os.walk(src_dir):
        for fname in files:
            rel = os.path.relpath(os.path.join(root, fname), src_dir)
            with open(os.path.join(root, fname), "rb") as f:
                data = f.read()
            blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
            if not os.path.exists(blob):
                with open(blob, "wb") as f:
                    f.write(data)
            link = os.path.join(snapshot, rel)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot
