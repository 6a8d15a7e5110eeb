"""carapp web app (also the Hugging Face Spaces entry point).

    python app.py [--data ROOT] [--checkpoint RUN_OR_FILE] [--runs-dir checkpoints] [--detector DET] [--share]

Host and port: GRADIO_SERVER_NAME / GRADIO_SERVER_PORT. Environment: CARAPP_DATA, CARAPP_CHECKPOINT, CARAPP_DETECTOR,
CARAPP_ALLOW_TRAINING=1 (public mode), CARAPP_AUTH=user:password, CARAPP_FIRST_MODEL=0 (a public app with no model
does not train the demo preset at start-up); the README lists the limits (CARAPP_QUEUE_SIZE, ...).
"""
import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline-friendly: no version check at start
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from carapp.ui.app import build_app, launch  # noqa: E402
from carapp.ui.settings import resolve_settings  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="carapp: car make/model classifier with Grad-CAM")
    parser.add_argument("--data", help="dataset root (default: CARAPP_DATA, else the built-in demo dataset)")
    parser.add_argument("--checkpoint", help="run directory or checkpoint file (default: the run whose best.pt has the best val accuracy)")
    parser.add_argument("--runs-dir", help="where run directories live (default: checkpoints/)")
    parser.add_argument("--detector", help="find every car first: a detector run, its checkpoint, coco, or none "
                        "(default: CARAPP_DETECTOR, else the newest detector run in the runs folder)")
    parser.add_argument("--share", action="store_true", help="public Gradio link (public mode: no training)")
    args = parser.parse_args()
    settings = resolve_settings(args.data, args.checkpoint, args.runs_dir, args.share, args.detector)
    launch(build_app(settings), settings, share=args.share)
