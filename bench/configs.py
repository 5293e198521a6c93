"""Config files for the peers: the nginx upstream, the nginx proxy, Caddy and Garrison.

Every proxy terminates TLS with the same certificate (where it can), keeps connections to the
upstream alive, streams both ways, and writes a JSON access log line per request to a file.
"""

from __future__ import annotations

from pathlib import Path

from bench.certs import CertFiles

# The 100-byte response of the small-GET workloads.
BODY_100 = ("garrison-bench " * 7)[:99] + "\n"
assert len(BODY_100) == 100

_NGINX_TEMP = """
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
"""

_NGINX_LOG_FORMAT = (
    "log_format bench escape=json '{"
    '"ts":"$time_iso8601","client":"$remote_addr","method":"$request_method",'
    '"path":"$uri","status":$status,"bytes":$body_bytes_sent,"duration_s":$request_time,'
    '"upstream_s":"$upstream_response_time","tls":"$ssl_protocol",'
    '"reused":"$ssl_session_reused"'
    "}';"
)


def nginx_upstream(directory: Path, port: int) -> Path:
    """The fast upstream of the small-GET workloads: nginx, plain HTTP, 1 worker, no log."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(
        f"""daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  {_NGINX_TEMP.format(d=directory)}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      default_type text/plain;
      return 200 "{BODY_100.rstrip()}\\n";
    }}
  }}
}}
"""
    )
    return conf


def nginx_proxy(directory: Path, port: int, upstream_port: int, certs: CertFiles) -> Path:
    """nginx as the TLS reverse proxy: 1 worker, keep-alive upstream pool, no buffering."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(
        f"""daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  {_NGINX_LOG_FORMAT}
  access_log {directory}/access.log bench buffer=64k flush=1s;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  {_NGINX_TEMP.format(d=directory)}
  upstream app {{
    server 127.0.0.1:{upstream_port};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} ssl backlog=4096;
    ssl_certificate {certs.cert};
    ssl_certificate_key {certs.key};
    ssl_protocols TLSv1.2 TLSv1.3;
    client_max_body_size 0;
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 300s;
    }}
  }}
}}
"""
    )
    return conf


def caddyfile(directory: Path, port: int, upstream_port: int, certs: CertFiles) -> Path:
    """Caddy as the TLS reverse proxy: the same certificate, flush at once, logs to a file.

    The site has no host so that clients without SNI (hey, Go, does not send SNI for an IP) are
    served too: with `https://127.0.0.1:PORT` Caddy 2.6 fails their handshakes.
    """
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "Caddyfile"
    conf.write_text(
        f"""{{
  admin off
  auto_https off
  storage file_system {directory}/data
  servers {{
    protocols h1 h2
  }}
  log {{
    output file {directory}/caddy.log
    level WARN
  }}
}}

https://:{port} {{
  tls {certs.cert} {certs.key}
  log {{
    output file {directory}/access.log
    format json
  }}
  reverse_proxy 127.0.0.1:{upstream_port} {{
    flush_interval -1
  }}
}}
"""
    )
    return conf


# The routes of Garrison's auth rows: the same upstream as "/", each behind one method.
AUTH_ROUTES = {"key": "/auth-key/", "jwt": "/auth-jwt/"}
# The route of the limits rows: an API key (limits are per identity), a rate far above what the
# bench can send and a concurrency far above its 32 connections, so that nothing is refused.
LIMITS_ROUTE = "/lim/"
LIMITS_RATE = "100000000/minute"
LIMITS_CONCURRENCY = 1000


def redis_url(port: int) -> str:
    """The `[limits] backend` of a Garrison that keeps its counters in the bench's redis-server."""
    return f"redis://127.0.0.1:{port}/0"


def redis_argv(executable: str, port: int) -> list[str]:
    """A throwaway redis-server on 127.0.0.1:port: no RDB snapshots, no AOF."""
    return [
        executable,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
    ]


# Appended to Garrison's config for the observe row: the same process without its audit log
# and per-request metrics (reloaded with SIGHUP, then reloaded back).
UNOBSERVED = '\n[audit]\nsink = "off"\n\n[metrics]\nenabled = false\n'


def garrison_config(
    directory: Path, certs: CertFiles, upstream_port: int, limits_backend: str = "memory"
) -> Path:
    """Garrison's config: JSON access log to a file; "/" public (`auth = ["none"]`, the baseline
    of every workload); /auth-key/ (API key only) and /auth-jwt/ (JWT only) to the same upstream
    with the prefix stripped, so that they differ from "/" by authentication alone; /lim/ (API key,
    a rate and a concurrency limit) likewise, its counters in `limits_backend` ("memory" or a
    redis:// URL). "/" and the auth routes have no limits, so the limits stage passes them by.
    The audit log and metrics are Garrison's defaults (a line per request to <data>/audit.log,
    fsynced every second; per-request counters); the observe row turns both off (UNOBSERVED)."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "garrison.toml"
    conf.write_text(
        f"""[server]
access_log = "{directory}/access.log"
max_body = "8GiB"

[limits]
backend = "{limits_backend}"

[[upstream]]
name = "app"
url = "http://127.0.0.1:{upstream_port}"

[[route]]
path = "/"
upstream = "app"
auth = ["none"]

[[route]]
path = "{AUTH_ROUTES["key"]}"
upstream = "app"
strip_prefix = true
auth = ["api_key"]

[[route]]
path = "{AUTH_ROUTES["jwt"]}"
upstream = "app"
strip_prefix = true
auth = ["jwt"]

[[route]]
path = "{LIMITS_ROUTE}"
upstream = "app"
strip_prefix = true
auth = ["api_key"]
rate = ["{LIMITS_RATE}"]
concurrency = {LIMITS_CONCURRENCY}
"""
    )
    _ = certs  # Garrison issues its own ECDSA P-256 certificate; see targets.garrison_cert_note.
    return conf
