"""The gateway of one process: certificates, listeners and pipeline from a config; reload; stop.

`garrison up` builds one Gateway per worker process. Everything a request needs lives in a
Runtime that reload() replaces whole; sockets and the TLS context stay, so nothing is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import platformdirs

from garrison import config as config_mod
from garrison.acme.manager import AcmeManager, Outcome
from garrison.acme.renewer import attempt, renew_forever
from garrison.auth.service import AuthService
from garrison.config import Config, LimitsConfig, parse_hostport
from garrison.fsutil import ensure_private_dir
from garrison.http.server import ServerState, bind_socket, drain, serve_https, serve_redirect
from garrison.limits.fair import FairGate
from garrison.limits.memory import MemoryBackend
from garrison.limits.model import Backend
from garrison.observe.accesslog import AccessLog
from garrison.observe.audit import AuditLog
from garrison.pki.ca import CertificateAuthority, read_passphrase_file
from garrison.pki.client_certs import ClientCerts
from garrison.pki.handshake_trace import HandshakeTracer
from garrison.pki.live_cert import LiveCertificate
from garrison.pki.server_cert import ServerCertificate, ensure_server_certificate
from garrison.pki.tls import TLSConfigError, reload_context, server_context
from garrison.runtime import Runtime, build_runtime
from garrison.store.db import default_url, open_store

log = logging.getLogger("garrison")

POOL_SWEEP_SECONDS = 15.0
POOL_MAX_IDLE_AGE = 60.0
CERT_CHECK_SECONDS = 3600.0
START_ISSUANCE_WAIT = 40.0  # below the supervisor's 60 s wait for a worker to be ready
CERT_WATCH_SECONDS = 2.0  # [tls] acme/files: how soon a changed certificate file is served


@dataclass(frozen=True)
class UpOptions:
    """What `garrison up` was asked for; flags win over the config file."""

    config_file: Path | None = None
    upstream: str | None = None
    listen: str | None = None
    http_listen: str | None = None
    hostnames: tuple[str, ...] = ()
    data_dir: Path | None = None
    workers: int = 1
    demo: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    def load_config(self) -> Config:
        return config_mod.build(
            self.config_file,
            upstream=self.upstream,
            listen=self.listen,
            http_listen=self.http_listen,
            hostnames=self.hostnames,
        )

    def with_upstream(self, url: str) -> UpOptions:
        return replace(self, upstream=url)


def resolve_data_dir(explicit: Path | None) -> Path:
    """--data-dir, else $GARRISON_HOME, else the platform's user data dir."""
    if explicit is not None:
        return explicit.expanduser().resolve()
    env = os.environ.get("GARRISON_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return Path(platformdirs.user_data_dir("garrison"))


def ca_passphrase() -> bytes | None:
    """The CA key passphrase: $GARRISON_CA_PASSPHRASE_FILE (a file keeps it out of every child
    process's environment), else $GARRISON_CA_PASSPHRASE, else none (key unencrypted)."""
    path = os.environ.get("GARRISON_CA_PASSPHRASE_FILE")
    if path:
        return read_passphrase_file(Path(path))
    value = os.environ.get("GARRISON_CA_PASSPHRASE")
    return value.encode() if value else None


def prepare_certificates(
    data_dir: Path, config: Config
) -> tuple[CertificateAuthority, ServerCertificate]:
    """Create the CA on first start and a server certificate for every configured name."""
    ensure_private_dir(data_dir)
    ca = CertificateAuthority.load_or_create(data_dir, ca_passphrase())
    cert = ensure_server_certificate(
        data_dir, ca, config.server.hostnames, days=config.server.server_cert_days
    )
    return ca, cert


def bind_listeners(config: Config, reuse_port: bool) -> tuple[socket.socket, socket.socket | None]:
    host, port = parse_hostport(config.server.listen)
    https = bind_socket(host, port, reuse_port)
    redirect = None
    if config.server.http_listen:
        rhost, rport = parse_hostport(config.server.http_listen)
        try:
            redirect = bind_socket(rhost, rport, reuse_port)
        except BaseException:
            https.close()
            raise
    return https, redirect


class Gateway:
    """One process's gateway: serves until stop() and reloads on request."""

    def __init__(self, options: UpOptions, config: Config, data_dir: Path) -> None:
        self.options = options
        self.config = config
        self.data_dir = data_dir
        self.access_log = AccessLog(config.server.access_log)
        self.audit = AuditLog(config.audit, data_dir)
        self.ca: CertificateAuthority | None = None
        self.server_cert: ServerCertificate | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self._loaded_pem = b""
        self.state: ServerState | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.https_port = 0
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._probes: set[asyncio.Future[None]] = set()
        self.auth: AuthService | None = None
        self.limits_backend: Backend = MemoryBackend()
        self.gates: dict[str, FairGate] = {}
        self.acme: AcmeManager | None = None
        self.live_cert: LiveCertificate | None = None

    async def start(self, https_sock: socket.socket, redirect_sock: socket.socket | None) -> None:
        self.ca, self.server_cert = prepare_certificates(self.data_dir, self.config)
        self.https_port = https_sock.getsockname()[1]
        tls = self.config.tls
        if tls.source == "acme":
            self.acme = AcmeManager(self.data_dir, tls.acme)
            # HTTP-01 needs the plain-HTTP listener before the first order is placed.
            if redirect_sock is not None:
                self.servers.append(
                    await serve_redirect(
                        redirect_sock, lambda: self.https_port, self.acme.challenges
                    )
                )
                redirect_sock = None
            if self.acme.usable() is None:
                await self._first_issuance()
        cert_path, key_path = self._wanted_pair()
        self.ssl_context = server_context(
            self.config.server.tls_profile,
            cert_path,
            key_path,
            client_ca=self._client_ca(self.config),
        )
        self.live_cert = LiveCertificate(self.ssl_context, cert_path, key_path)
        if self.config.client_certs.mode != "off":
            HandshakeTracer(self.audit).install(self.ssl_context)
        self._loaded_pem = self.server_cert.cert_path.read_bytes()
        self.auth = AuthService(
            open_store(default_url(self.data_dir)), self.config.auth, self.config.client_certs
        )
        await self.auth.start()
        self.limits_backend = await open_limits_backend(self.config.limits)
        self.state = ServerState(self._build_runtime(self.config))
        self.servers.append(await serve_https(https_sock, self.ssl_context, self.state))
        if redirect_sock is not None:
            self.servers.append(await serve_redirect(redirect_sock, lambda: self.https_port))
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_exception_handler)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        self._tasks.append(asyncio.ensure_future(self._periodic()))
        self._probe_idle_upstreams()  # the overview knows each upstream's state from the start
        if tls.source != "internal":
            self._tasks.append(asyncio.ensure_future(self._watch_certificate()))
        if self.acme is not None:
            self._tasks.append(asyncio.ensure_future(renew_forever(self.acme, self._acme_outcome)))

    async def _first_issuance(self) -> None:
        """Try to get the certificate before "ready", but not for longer than the supervisor
        waits for a worker: a slow CA finishes in the background and is swapped in then."""
        assert self.acme is not None
        task = asyncio.ensure_future(attempt(self.acme, source="issuance"))
        done, _ = await asyncio.wait({task}, timeout=START_ISSUANCE_WAIT)
        if done:
            self._acme_outcome(task.result(), "issuance")
            return
        log.warning(
            "ACME issuance still running after %ds; serving the internal certificate until "
            "it completes",
            int(START_ISSUANCE_WAIT),
        )
        task.add_done_callback(
            lambda t: None if t.cancelled() else self._acme_outcome(t.result(), "issuance")
        )
        self._tasks.append(task)  # type: ignore[arg-type]

    def _acme_outcome(self, outcome: Outcome, stage: str = "renewal") -> None:
        """Serve a new ACME certificate at once, and keep an audit line of every attempt."""
        assert self.acme is not None
        names = list(self.acme.config.names)
        if outcome.renewed:
            state = self.acme.live.read_state()
            self.audit.event(
                "acme_certificate",
                {"stage": stage, "names": names, "serial": state.serial, "until": state.not_after},
            )
            self._swap()
        elif outcome.error:
            self.audit.event(
                "acme_failure", {"stage": stage, "names": names, "error": outcome.error}
            )

    def _wanted_pair(self) -> tuple[Path, Path]:
        """The pair to serve: the ACME certificate once there is a usable one (the internal
        one until then, so the gateway is up while issuance retries), or [tls.files]."""
        tls = self.config.tls
        if tls.source == "files":
            assert tls.files.cert is not None and tls.files.key is not None
            return tls.files.cert, tls.files.key
        if self.acme is not None and self.acme.usable() is not None:
            return self.acme.live.chain_path, self.acme.live.key_path
        assert self.server_cert is not None
        return self.server_cert.cert_path, self.server_cert.key_path

    def _swap(self) -> None:
        """Serve the wanted pair if it is not the one loaded, or if its files changed."""
        if self.live_cert is None:
            return
        try:
            self.live_cert.want(*self._wanted_pair())
        except (TLSConfigError, OSError, ValueError) as exc:
            log.error("new server certificate refused, the current one keeps serving: %s", exc)

    async def _watch_certificate(self) -> None:
        while True:
            await asyncio.sleep(CERT_WATCH_SECONDS)
            self._swap()

    def _client_ca(self, config: Config) -> Path | None:
        """The CA bundle client certificates must chain to, or None without mutual TLS."""
        client = config.client_certs
        if client.mode == "off":
            return None
        if client.ca == "internal":
            assert self.ca is not None
            return self.ca.cert_path
        return Path(client.ca)

    def _build_runtime(self, config: Config) -> Runtime:
        assert self.auth is not None
        self.auth.configure(config.auth)
        return build_runtime(
            config,
            self.access_log,
            self.auth,
            self._crl_builder(),
            self.limits_backend,
            self.gates,
            self.audit,
            self.ca,
        )

    def _crl_builder(self) -> Callable[[], bytes] | None:
        """The internal CA's CRL, signed on demand (served at /.garrison/crl.pem)."""
        if self.ca is None or self.auth is None:
            return None
        certs = ClientCerts(self.auth.engine, self.ca)
        return certs.crl

    async def reload(self) -> bool:
        """Re-read the config and certificates; on any error keep serving with the old ones."""
        assert self.state is not None and self.ssl_context is not None
        try:
            config = self.options.load_config()
        except config_mod.ConfigError as exc:
            log.error("reload refused, keeping the running configuration:\n%s", exc)
            return False
        if config.server.listen != self.config.server.listen or (
            config.server.http_listen != self.config.server.http_listen
        ):
            log.warning("listen addresses changed: restart garrison to apply them")
        if config.server.tls_profile != self.config.server.tls_profile:
            log.warning("tls_profile changed: restart garrison to apply it")
        if config.client_certs != self.config.client_certs:
            log.warning("[client_certs] changed: restart garrison to apply it")
            config = config.model_copy(update={"client_certs": self.config.client_certs})
        if config.tls != self.config.tls:
            log.warning("[tls] changed: restart garrison to apply it")
            config = config.model_copy(update={"tls": self.config.tls})
        try:
            self._refresh_certificate(config)
        except (TLSConfigError, OSError, ValueError) as exc:
            log.error("reload refused, certificate problem: %s", exc)
            return False
        if config.audit != self.config.audit:
            try:
                self.audit.configure(config.audit)  # in place: every holder sees the new sink
            except OSError as exc:
                log.error("reload refused, cannot open the audit log: %s", exc)
                return False
        else:
            self.audit.reopen()
        old = self.state.runtime
        if config.server.access_log != self.config.server.access_log:
            self.access_log.flush()
            self.access_log = AccessLog(config.server.access_log)
        else:
            self.access_log.reopen()
        self.state.runtime = self._build_runtime(config)
        self.config = config
        old.close()
        log.info("configuration reloaded")
        return True

    def _refresh_certificate(self, config: Config) -> None:
        assert self.ca is not None and self.ssl_context is not None
        cert = ensure_server_certificate(
            self.data_dir, self.ca, config.server.hostnames, days=config.server.server_cert_days
        )
        # Compare the file itself: another worker may have reissued it with the same names
        # and the same expiry second.
        pem = cert.cert_path.read_bytes()
        serving_internal = self.live_cert is None or self.live_cert.cert_path == cert.cert_path
        if serving_internal and (
            self.server_cert is None or cert.reissued or pem != self._loaded_pem
        ):
            self._loaded_pem = pem
            reload_context(self.ssl_context, cert.cert_path, cert.key_path)
            log.info(
                "server certificate loaded: %s, valid until %s",
                ", ".join(cert.names),
                cert.not_after.isoformat(),
            )
        self.server_cert = cert

    async def _periodic(self) -> None:
        elapsed = 0.0
        while True:
            await asyncio.sleep(POOL_SWEEP_SECONDS)
            elapsed += POOL_SWEEP_SECONDS
            if self.state is not None:
                for pool in self.state.runtime.pools.values():
                    pool.sweep(POOL_MAX_IDLE_AGE)
                self._probe_idle_upstreams()
            if elapsed >= CERT_CHECK_SECONDS:
                elapsed = 0.0
                try:
                    self._refresh_certificate(self.config)
                except Exception as exc:  # keep serving with the current certificate
                    log.error("server certificate renewal failed: %s", exc)

    def _probe_idle_upstreams(self) -> None:
        """One TCP connect to each upstream that had no new connection lately (http/health.py)."""
        assert self.state is not None
        now = time.monotonic()
        for pool in self.state.runtime.pools.values():
            if pool.health.stale(now):
                task = asyncio.ensure_future(pool.probe())
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded grace), then return."""
        if self._stopped.is_set() or self.state is None:
            self._stopped.set()
            return
        for server in self.servers:
            server.close()
        grace = self.config.server.timeouts.shutdown_grace
        clean = await drain(self.state, grace)
        if not clean:
            log.warning("shutdown grace of %gs ran out; remaining connections closed", grace)
        for task in self._tasks:
            task.cancel()
        self.state.runtime.close()
        if self.auth is not None:
            await self.auth.stop()
        await self.limits_backend.close()
        self.access_log.flush()
        self.audit.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def open_limits_backend(config: LimitsConfig) -> Backend:
    """Memory, or Redis (its connection is made here; failures follow on_backend_error)."""
    if config.backend == "memory":
        return MemoryBackend()
    from garrison.limits.redis_backend import RedisBackend

    backend = RedisBackend(config.backend, on_error=config.on_backend_error, lease=config.lease)
    await backend.start()
    return backend


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """TLS handshake failures and resets from clients are normal traffic, not errors."""
    exc = context.get("exception")
    if isinstance(exc, ssl.SSLError | ConnectionResetError | BrokenPipeError | TimeoutError):
        log.debug("connection error: %s", exc)
        return
    message = str(context.get("message", ""))
    if "SSL handshake" in message or "handshake" in message.lower():
        log.debug("%s", message)
        return
    loop.default_exception_handler(context)
