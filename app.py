"""GenARM demo: steer a language model with autoregressive reward models, token by token.

`python app.py` serves the demo (models.yaml's offered profiles) on one port: the page at /, its
named Gradio API (/generate_json) and the OpenAI-compatible routes under /v1; all live in demo/.
"""
import os

from demo import build_app

if __name__ == "__main__":
    build_app().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                       server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
