"""The HTML the gateway shows people: login and logout. Plain, self-contained, no scripts."""

from __future__ import annotations

from html import escape

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;background:#f5f6f8;color:#1f2933;
margin:0;display:flex;min-height:100vh;align-items:center;justify-content:center}
main{background:#fff;border-radius:12px;box-shadow:0 2px 12px rgba(0,0,0,.08);padding:2.2rem 2.6rem;
width:22rem}
h1{margin:0 0 1.2rem;font-size:1.35rem}
label{display:block;font-size:.9rem;margin:.8rem 0 .3rem;color:#3e4c59}
input[type=text],input[type=password]{width:100%;box-sizing:border-box;padding:.6rem .7rem;
border:1px solid #cbd2d9;border-radius:6px;font-size:1rem}
button{margin-top:1.3rem;width:100%;padding:.65rem;border:0;border-radius:6px;background:#2f6fed;
color:#fff;font-size:1rem;cursor:pointer}
.error{background:#fde8e8;color:#9b1c1c;border-radius:6px;padding:.6rem .8rem;font-size:.9rem}
.note{color:#52606d;font-size:.85rem;margin-top:1rem}
"""

_LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Sign in</title><style>{style}</style></head>
<body><main><h1>Sign in</h1>{error}
<form method="post" action="/.garrison/login">
<input type="hidden" name="csrf" value="{csrf}">
<input type="hidden" name="next" value="{next}">
<label for="username">User name</label>
<input id="username" name="username" type="text" autocomplete="username" value="{username}"
 required autofocus>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Sign in</button>
</form></main></body></html>
"""

_LOGOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Sign out</title><style>{style}</style></head>
<body><main><h1>{title}</h1>{body}</main></body></html>
"""


def login_page(csrf: str, next_path: str, username: str = "", error: str = "") -> bytes:
    error_html = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    return _LOGIN.format(
        style=_STYLE,
        error=error_html,
        csrf=escape(csrf),
        next=escape(next_path),
        username=escape(username),
    ).encode()


def logout_page(signed_in: bool) -> bytes:
    if signed_in:
        body = (
            '<form method="post" action="/.garrison/logout">'
            '<label><input type="checkbox" name="everywhere" value="1"> '
            "Sign out on every device</label>"
            '<button type="submit">Sign out</button></form>'
        )
        return _LOGOUT.format(style=_STYLE, title="Sign out", body=body).encode()
    body = '<p>You are signed out.</p><p class="note"><a href="/">Sign in again</a></p>'
    return _LOGOUT.format(style=_STYLE, title="Signed out", body=body).encode()
