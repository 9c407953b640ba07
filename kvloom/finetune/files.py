"""Uploaded files (OpenAI's /v1/files), kept in memory: they live as long as the server process."""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

from kvloom.errors import InvalidRequestError, NotFoundError

PURPOSES = ("fine-tune",)


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def to_api(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": len(self.content), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


class FileStore:
    def __init__(self, max_files: int = 1000):
        self.max_files = max_files
        self._files: dict[str, StoredFile] = {}
        self._lock = threading.Lock()

    def add(self, filename: str, purpose: str, content: bytes) -> StoredFile:
        if purpose not in PURPOSES:
            raise InvalidRequestError(f"purpose {purpose!r} is not supported; this server takes {PURPOSES}",
                                      field="purpose")
        if not content:
            raise InvalidRequestError("the file is empty", field="file")
        stored = StoredFile(f"file-{secrets.token_hex(12)}", filename, purpose, content, int(time.time()))
        with self._lock:
            if len(self._files) >= self.max_files:
                raise InvalidRequestError(f"this server holds {self.max_files} files at most; delete some first",
                                          field="file")
            self._files[stored.id] = stored
        return stored

    def get(self, file_id: str) -> StoredFile:
        stored = self._files.get(file_id)
        if stored is None:
            raise NotFoundError(f"no file {file_id!r}", field="file_id")
        return stored

    def list(self) -> list[StoredFile]:
        with self._lock:
            return sorted(self._files.values(), key=lambda f: f.created_at, reverse=True)

    def delete(self, file_id: str) -> None:
        with self._lock:
            if self._files.pop(file_id, None) is None:
                raise NotFoundError(f"no file {file_id!r}", field="file_id")
