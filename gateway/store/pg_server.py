"""A throwaway PostgreSQL cluster for tests and benchmarks, from the Debian packages.

``initdb`` and ``pg_ctl`` from ``/usr/lib/postgresql/<version>/bin`` make a cluster in a
temporary directory that listens on a unix socket in that directory only (no TCP port to
collide with), with ``trust`` authentication for it; ``stop`` removes it all. PostgreSQL
refuses to run as root, so as root the cluster is made and run as the ``postgres`` user
(which Debian's package creates). Not for production: nothing here is tuned or secured
beyond the directory's mode.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from gateway.logs import get_logger

log = get_logger(__name__)

PORT = 5432  # in a private socket directory: no other server shares it
DATABASE = "gateway"


def pg_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (with initdb and pg_ctl), or None."""
    found = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        version = Path(initdb).parent.parent.name
        if version.isdigit() and os.access(Path(initdb).parent / "pg_ctl", os.X_OK):
            found.append((int(version), Path(initdb).parent))
    return max(found)[1] if found else None


class PgServer:
    """A started throwaway cluster; ``url`` is what ``open_store`` takes."""

    def __init__(self, bindir: Path, root: Path, user: str | None) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self._user = user
        self._databases = 0

    @property
    def url(self) -> str:
        """The cluster's ``gateway`` database, over the unix socket."""
        return f"postgresql:///{DATABASE}?host={self.root}&port={PORT}&user=gateway"

    @classmethod
    def start(cls, parent: Path | None = None, *, bindir: Path | None = None) -> PgServer:
        """initdb, start and create the ``gateway`` database; RuntimeError if any fails."""
        bindir = bindir or pg_bindir()
        if bindir is None:
            raise RuntimeError("no PostgreSQL server installed (/usr/lib/postgresql/*/bin)")
        root = Path(tempfile.mkdtemp(prefix="gateway-pg-", dir=parent))
        user = None
        if os.geteuid() == 0:
            user = "postgres"
            entry = pwd.getpwnam(user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        cluster = cls(bindir, root, user)
        try:
            cluster._run(
                "initdb", "-D", str(cluster.data), "-U", "gateway", "--auth=trust",
                "-E", "UTF8", "--locale=C.UTF-8",
            )  # fmt: skip
            cluster.start_server()
            cluster._run("createdb", "-h", str(root), "-p", str(PORT), "-U", "gateway", DATABASE)
        except BaseException:
            cluster.stop()
            raise
        log.info("throwaway PostgreSQL started", extra={"dir": str(root)})
        return cluster

    def _run(self, tool: str, *args: str) -> None:
        argv = [str(self.bindir / tool), *args]
        if self._user is not None:
            argv = ["runuser", "-u", self._user, "--", *argv]
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            cwd=self.root,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            server_log = self.root / "server.log"
            tail = server_log.read_text()[-2000:] if server_log.exists() else ""
            raise RuntimeError(f"{tool} failed: {done.stderr.strip() or done.stdout}\n{tail}")

    def new_database(self) -> str:
        """Create another empty database in the cluster; its URL."""
        self._databases += 1
        name = f"{DATABASE}_{self._databases}"
        self._run("createdb", "-h", str(self.root), "-p", str(PORT), "-U", "gateway", name)
        return self.url.replace(f"/{DATABASE}?", f"/{name}?", 1)

    def restart(self) -> None:
        """Stop the server (fast: active connections are cut) and start it again."""
        # -l: the new server's output to the log, not to pipes that would never close.
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
            "-m", "fast", "-w", "-t", "60", "restart",
        )  # fmt: skip

    def start_server(self) -> None:
        """Start the server on the cluster's data directory (again, after ``stop_server``)."""
        options = f"-k {self.root} -c listen_addresses='' -p {PORT} -c max_connections=200"
        # -l: the server's output to the log, not to pipes that would never close.
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server and keep its data (``fast``: open connections are cut, as an
        operator's restart would; ``immediate``: as a crash would); ``start_server`` resumes."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def stop(self) -> None:
        """Stop the server (if it runs) and remove the cluster's directory."""
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except RuntimeError as e:
                log.warning("throwaway PostgreSQL did not stop", extra={"error": str(e)})
        shutil.rmtree(self.root, ignore_errors=True)
