"""A small real Gradio app for the end-to-end tests: a text Interface and a streaming chat.

Run: python gradio_app.py --port PORT [--root-path /app]. Prints `gradio app ready on PORT`
once it accepts requests. Nothing is fetched from the internet (system fonts, no analytics,
no share link, no SSR).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # after the environment is set: Gradio reads it at import

STEP_DELAY_S = 0.05


def reverse(text: str) -> str:
    """The Interface's function: deterministic, so tests can assert the output."""
    return text[::-1]


def digest(path: str | None) -> str:
    """The upload Interface: proves the file arrived whole through /gradio_api/upload."""
    if path is None:
        return ""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 16):
            sha.update(block)
            size += len(block)
    return f"{size} {sha.hexdigest()}"


def chat(message: str, history: list[dict[str, str]]) -> Iterator[str]:
    """Stream the answer word by word, each yield the answer so far (Gradio's contract)."""
    words = f"Echo: {message}".split()
    for i in range(1, len(words) + 1):
        time.sleep(STEP_DELAY_S)
        yield " ".join(words[:i])


def build() -> gr.Blocks:
    with gr.Blocks(title="Garrison e2e gradio") as demo:
        gr.Markdown("## Reverse")
        with gr.Column(elem_id="rev-box"):
            gr.Interface(
                fn=reverse,
                inputs=gr.Textbox(label="Text", elem_id="rev-in"),
                outputs=gr.Textbox(label="Reversed", elem_id="rev-out"),
                api_name="reverse",
                flagging_mode="never",
            )
        gr.Markdown("## Upload")
        with gr.Column(elem_id="file-box"):
            gr.Interface(
                fn=digest,
                inputs=gr.File(label="File", elem_id="file-in", type="filepath"),
                outputs=gr.Textbox(label="Size and SHA-256", elem_id="file-out"),
                api_name="digest",
                flagging_mode="never",
            )
        gr.Markdown("## Chat")
        gr.ChatInterface(
            fn=chat,
            chatbot=gr.Chatbot(elem_id="chatbot", height=260),
            textbox=gr.Textbox(elem_id="chat-in", placeholder="Ask…"),
            api_name="chat",
            autofocus=False,
        )
    return demo


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root-path", default=None)
    args = parser.parse_args()
    system = ["Liberation Sans", "DejaVu Sans", "sans-serif"]
    theme = gr.themes.Default(font=system, font_mono=["Liberation Mono", "monospace"])
    build().queue().launch(
        server_name="127.0.0.1",
        server_port=args.port,
        root_path=args.root_path,
        share=False,
        ssr_mode=False,
        prevent_thread_lock=True,
        quiet=True,
        theme=theme,
    )
    print(f"gradio app ready on {args.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()


if __name__ == "__main__":
    main()
