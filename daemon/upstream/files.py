"""The file transport: each email as an ``.eml`` file in a folder (the demo and local runs)."""

from __future__ import annotations

import email.policy
import os
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import TYPE_CHECKING

import anyio
import orjson

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from daemon.upstream.resend import OutgoingEmail


class FileTransport:
    """Writes each email as an .eml file (and its JSON) into a folder: for the demo and local runs."""

    name = "file"

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __repr__(self) -> str:
        return f"FileTransport(folder={str(self.folder)!r})"

    async def send(self, key: str, emails: Sequence[OutgoingEmail]) -> list[str]:
        """Write the batch (``key`` is not needed: a file is written once); ``file:NAME`` ids."""
        return await anyio.to_thread.run_sync(self._write, emails)

    def _write(self, emails: Sequence[OutgoingEmail]) -> list[str]:
        self.folder.mkdir(parents=True, exist_ok=True)
        ids = []
        for outgoing in emails:
            name = f"{outgoing.row_id:08d}"
            _atomic_write(self.folder / f"{name}.eml", to_eml(outgoing.payload))
            ids.append(f"file:{name}")
        return ids


def to_eml(payload: str) -> bytes:
    """The Resend JSON object of one email as an RFC 5322 message with text and HTML parts."""
    data = orjson.loads(payload)
    # RFC 2369 wants List-Unsubscribe as a literal <URL>; the default 78-column policy would encode it.
    message = EmailMessage(policy=email.policy.default.clone(max_line_length=998))
    message["From"] = data["from"] or "seatwatch@localhost"
    message["To"] = ", ".join(data["to"])
    message["Subject"] = data["subject"]
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain="seatwatch.local")
    for name, value in data.get("headers", {}).items():
        message[name] = value
    message.set_content(data["text"])
    message.add_alternative(data["html"], subtype="html")
    return bytes(message)


def _atomic_write(path: Path, content: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)
