"""The system test's debootstrap mirror comes from the host's own apt sources, in either of apt's formats."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.system.machine import MachineError, debian_mirror

if TYPE_CHECKING:
    from pathlib import Path


def write(apt: Path, name: str, text: str) -> None:
    path = apt / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_deb822_sources_give_the_release_archive_not_security_or_a_disabled_file(tmp_path: Path) -> None:
    """A .sources stanza naming bookworm is taken; security, deb-src, disabled stanzas and *.disabled files are not."""
    write(
        tmp_path,
        "sources.list.d/debian.sources",
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n",
    )
    write(tmp_path, "sources.list.d/other.list.disabled-by-farm", "deb http://elsewhere.example/apt stable main\n")
    assert debian_mirror(tmp_path) == "http://mirror.example/debian"


def test_one_line_sources_with_options_are_read(tmp_path: Path) -> None:
    """A one-line entry with [options] and a trailing comment is read; a commented-out line is not."""
    write(
        tmp_path,
        "sources.list",
        "# deb http://old.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main contrib # nearest\n",
    )
    assert debian_mirror(tmp_path) == "http://one.example/debian"


def test_another_release_suite_is_the_fallback(tmp_path: Path) -> None:
    """A host on another Debian release still names its archive (any plain suite with main, not security)."""
    write(tmp_path, "sources.list", "deb http://sec.example/debian-security trixie-security main\n")
    write(tmp_path, "sources.list.d/main.list", "deb http://arch.example/debian trixie main\n")
    assert debian_mirror(tmp_path) == "http://arch.example/debian"


def test_no_archive_is_refused_with_the_folder_named(tmp_path: Path) -> None:
    """No usable entry: a MachineError naming where it looked, not a guessed host."""
    write(tmp_path, "sources.list", "deb http://ppa.example/ubuntu jammy-updates universe\n")
    with pytest.raises(MachineError, match=str(tmp_path)):
        debian_mirror(tmp_path)
