"""Predict tab: a photo in (drop, upload, paste, webcam), the top-5 and a Grad-CAM heatmap out.

The event is the app's stable API endpoint `/predict`: the image first, every other input with a default; outputs
the label confidences and the heatmap. The upload reaches carapp's own decoder (preprocess=False), so a broken file
gets a message that names the problem — and so carapp itself checks that the file is one Gradio accepted.

With a detector (settings.detector_source) every car is found first: the photo shows numbered boxes, choosing one
shows its answer, and `/predict` answers for the most prominent car. `/predict_cars` returns every car as JSON
(predict --json's entry: the photo's fields and `cars`, boxes in the photo's pixels).
"""
from __future__ import annotations

import contextlib
import threading
import uuid
from pathlib import Path

import gradio as gr

from .. import rundir
from ..config import CAM_METHODS
from ..dataset.images import PHOTO_DRAFT_SIZE, ImageError, open_image
from ..runs import find_run, list_runs
from . import first_model, hardware, jobs
from .settings import CONFIGURED, AppSettings
from .uploads import EXAMPLES, accepted_upload

TOP1 = "top-1 prediction"
SLOW_CAM_BUSY = ("Another slow heatmap is being computed; try again in a moment, or use gradcam (instant).")
MODEL_SLIDER_INFO = "the model's own: where its validation answers reach the target accuracy"
_SLOW_CAM = threading.BoundedSemaphore(1)  # ScoreCAM & co: one at a time, whatever the queue's concurrency


def model_choices(settings: AppSettings) -> list[tuple[str, str]]:
    """The configured model first, then the trained runs, best validation accuracy of their best.pt first (the
    default is the best)."""
    runs = sorted((r for r in list_runs(settings.runs_dir, "classifier") if (r.path / "best.pt").is_file()),
                  key=lambda r: -(r.best_val_acc if r.best_val_acc is not None else -1.0))
    choices = [(f"{r.name} (best.pt: val acc {r.best_val_acc:.1%})" if r.best_val_acc is not None else r.name, r.name)
               for r in runs]
    if settings.checkpoint:
        shown = "configured model" if settings.public else f"configured: {settings.checkpoint}"
        choices.insert(0, (shown, CONFIGURED))
    return choices


def default_model(settings: AppSettings) -> str | None:
    choices = model_choices(settings)
    return choices[0][1] if choices else None


def resolve_model(source: str | None, settings: AppSettings) -> str:
    if not source:
        raise gr.Error(no_model_message(settings), print_exception=False)
    if source == CONFIGURED and settings.checkpoint:
        return settings.checkpoint
    if source.startswith("hf://") and settings.paths_editable:
        return source
    run = find_run(settings.runs_dir, source)
    if run is not None:
        return str(run)
    if settings.paths_editable and Path(source).exists():
        return source
    raise gr.Error(f"Unknown model {source!r}.", print_exception=False)


def predict(image, model: str | None = None, method: str = "gradcam", target: str | None = TOP1,
            tta: bool = False, model_threshold: float | None = None, make_threshold: float | None = None, *,
            settings: AppSettings):
    """/predict: label confidences, the heatmap, the answer in words, make confidences (with a detector: of the
    most prominent car)."""
    result, calibrated, _ = classify(image, model, method, target, tta, model_threshold, make_threshold, settings,
                                     find_cars=True)
    return ({label: prob for label, prob in result.top}, result.cam, answer_markdown(result, calibrated),
            {m: p for m, p in result.makes})


def predict_cars(image, model: str | None = None, *, settings: AppSettings) -> dict:
    """/predict_cars: every car of the photo as JSON, as `predict --json` gives it (boxes in the photo's pixels)."""
    if not settings.detector_source:
        raise gr.Error("This app has no car detector: its owner sets one with --detector or CARAPP_DETECTOR "
                       "(python -m carapp train-detector trains one).", print_exception=False)
    result, _, _ = classify(image, model, "none", TOP1, False, None, None, settings, True, draft=None)
    return {"image": (image.get("orig_name") if isinstance(image, dict) else None) or "photo", **result.to_json()}


def classify(image, model, method, target, tta, model_threshold, make_threshold, settings: AppSettings,
             find_cars: bool = False, draft: int | None = PHOTO_DRAFT_SIZE):
    """(the Prediction, whether the model is calibrated, the photo) for a photo Gradio accepted; problems as
    gr.Error. With find_cars and a detector, one answer per car. The answer is computed in hardware.answer_photos
    (a GPU call on ZeroGPU); the model's calibration is read here."""
    path = accepted_upload(image)
    name = image.get("orig_name") if isinstance(image, dict) else None
    try:
        photo = open_image(path, draft_size=draft)
    except ImageError as exc:
        raise gr.Error(f"{name or 'This file'}: {exc.reason}", print_exception=False) from None
    source = resolve_model(model or default_model(settings), settings)  # raises its own clear gr.Error
    calibration = host_predictor(source, settings).calibration
    if method not in (*CAM_METHODS, "none"):
        raise gr.Error(f"Unknown heatmap method {method!r}: one of {', '.join(CAM_METHODS)} or none.",
                       print_exception=False)
    detector = settings.detector_source if find_cars else None
    options = {"top_k": 5, "cam": method != "none", "method": method, "tta": bool(tta),
               "thresholds": moved_thresholds(checked_thresholds(model_threshold, make_threshold),
                                              calibration.thresholds)}
    if not detector:  # each car's heatmap explains that car's own answer
        options["target"] = None if target in (None, "", TOP1) else target
    with _heatmap_slot(method, settings):  # refuses with its own message
        try:
            result = hardware.answer_photos(str(source), [photo], options, detector)[0]
        except gr.Error as exc:  # it may name the model's or the detector's folder
            raise gr.Error(settings.redact(exc.message), print_exception=False) from None
    for answer in [result, *(result.cars or [])]:
        answer.reason = settings.redact(answer.reason)  # it may name the detector's folder
        if answer.cam is not None:
            # Gradio caches output images by content and rewrites the file each time: two visitors getting the
            # same heatmap at once (the same example) would share a file that is rewritten while it is sent. A
            # per-answer id in the PNG's text makes each answer its own file.
            answer.cam.info["carapp-answer"] = uuid.uuid4().hex
    return result, calibration.calibrated, photo


def host_predictor(source, settings: AppSettings):
    """The model as this process may hold it (hardware.host_device): for its calibration, labels and description.
    A model that cannot load is a clear message."""
    from ..checkpoint import CheckpointError
    from ..predict import cached_predictor
    try:
        return cached_predictor(source, hardware.host_device())
    except (CheckpointError, ValueError, OSError) as exc:
        raise gr.Error(settings.redact(f"Cannot load the model: {exc}"), print_exception=False) from None


def no_model_message(settings: AppSettings) -> str:
    """What a visitor is told while there is no model: the first model's progress when it is being trained."""
    job = first_model.progress(settings)
    if job:
        return job
    if settings.training_enabled:
        return ("No trained model yet: press **Train the demo model** here (3-5 minutes on a 2-core CPU), train one "
                "in the Train tab, or start the app with --checkpoint.")
    return "No trained model yet: this app's owner has not configured one (CARAPP_CHECKPOINT)." + (
        f" {settings.training_off}" if settings.zerogpu else "")


NO_CARS = (gr.AnnotatedImage(value=None, visible=False), gr.Radio(choices=[], value=None, visible=False), [])


def show_answer(image, model=None, method="gradcam", target=TOP1, tta=False, model_threshold=None,
                make_threshold=None, find_cars=True, *, settings: AppSettings):
    """The Predict tab's own call (upload, example, Classify): a problem is shown in the answer panel, and the
    panels of the previous photo are cleared, instead of error badges over stale results. With a detector, also
    the photo with its numbered cars, the car chooser, and every car's panels (for the chooser)."""
    if image is None:
        return None, None, "", None, *NO_CARS
    if not (model or default_model(settings)):  # the model line above says what to do: not twice
        return None, None, "**Nothing to classify with yet** (see above).", None, *NO_CARS
    try:
        result, calibrated, photo = classify(image, model, method, target, tta, model_threshold, make_threshold,
                                             settings, find_cars)
    except gr.Error as exc:
        return None, None, f"**{exc.message}**", None, *NO_CARS
    if result.cars is None:
        return *answer_view(result, calibrated), *NO_CARS
    views = [answer_view(car, calibrated, (k, len(result.cars))) for k, car in enumerate(result.cars)]
    main = next((k for k, car in enumerate(result.cars) if car.box == result.box), None)
    labels = [car_label(k, car) for k, car in enumerate(result.cars)]
    boxes = gr.AnnotatedImage(value=(photo, [(tuple(round(v) for v in car.box), label)
                                             for car, label in zip(result.cars, labels)]), visible=True)
    chooser = gr.Radio(choices=[(label, k) for k, label in enumerate(labels)], value=main, visible=bool(labels))
    return *(views[main] if main is not None else answer_view(result, calibrated)), boxes, chooser, views


def answer_view(result, calibrated: bool, car: tuple[int, int] | None = None) -> tuple:
    """The panels of one answer: top-5, heatmap, the answer in words, makes. What is not named (the model of a
    make-only answer; anything not sure, too small or not a car) keeps its list, without a name as its headline."""
    return (gr.Label(value={label: prob for label, prob in result.top}, show_heading=result.status == "model"),
            result.cam, answer_markdown(result, calibrated, car),
            gr.Label(value={m: p for m, p in result.makes}, show_heading=result.status in ("model", "make")))


def car_label(k: int, car) -> str:
    """A car's name on the photo and in the chooser: its number and what it was answered."""
    name = {"model": car.top[0][0], "make": f"{car.make[0]} (model unsure)", "unsure": "not sure",
            "small": "too small to name", "no-car": "unlike the cars it knows"}[car.status]
    return f"{k + 1}: {name}"


def clicked_car(views: list, evt: gr.SelectData):
    """A click on a car's box (or its legend entry) chooses it."""
    return evt.index, *show_car(evt.index, views)


def show_car(k, views: list):
    """The chosen car's panels (the chooser, or a click on its box)."""
    if k is None or not views or not 0 <= int(k) < len(views):
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    return views[int(k)]


def cam_label(method: str) -> gr.Image:
    """A short title: the image's icons sit at its right end and covered a long one."""
    shown = {"none": "no heatmap", "gradcam": "Grad-CAM"}.get(method, method)
    return gr.Image(label=f"Where it looked ({shown})")


def page_thresholds(image, model, method, target, tta, model_threshold, make_threshold, find_cars, moved) -> tuple:
    """The page's inputs for show_answer, the sliders' values kept only when a person moved one: until the chosen
    model's thresholds reach the sliders they show 0.5, and a photo dropped at once was named from 50% where the
    model was calibrated to name from 85% (seen walking Predict). None stands for the model's own threshold."""
    if not moved:
        model_threshold = make_threshold = None
    return image, model, method, target, tta, model_threshold, make_threshold, find_cars


def checked_thresholds(model_threshold, make_threshold) -> dict:
    """The sliders' values (blank: the model's own calibrated thresholds); a raw API call cannot go outside (0, 1)."""
    thresholds = {}
    for key, value in (("model", model_threshold), ("make", make_threshold)):
        if value in (None, ""):
            continue
        if not isinstance(value, (int, float)) or not 0 < value < 1:
            raise gr.Error(f"The {key} threshold must be a number between 0 and 1 (exclusive), not {value!r}.",
                           print_exception=False)
        thresholds[key] = float(value)
    return thresholds


def answer_markdown(result, calibrated: bool, car: tuple[int, int] | None = None) -> str:
    """The answer in words: what the model is sure of, and what it is not; for car k of n, which car."""
    (name, prob), (make, make_prob) = result.top[0], result.make
    if result.status == "no-car" and result.ood_signal == "detector":
        return f"### No car found\n_Why: {result.reason}_"
    text = {
        "model": f"### {name}\n{prob:.0%} sure (make {make}: {make_prob:.0%})",
        "make": f"### {make} — model unsure\nmake {make_prob:.0%}; the likeliest model, {name}, only {prob:.0%}",
        "unsure": f"### Not sure\nNo make or model is likely enough (best guess: {name}, {prob:.0%})",
        "no-car": f"### This does not look like a car the model knows\n(its best guess would be {name}, "
                  f"{prob:.0%})",
        "small": f"### Too small to name\n(its best guess would be {name}, {prob:.0%})",
    }[result.status]
    if car is not None:
        text = f"**Car {car[0] + 1} of {car[1]}** (detector score {result.det_score:.2f})\n" + text
    if result.reason:
        text += f"  \n_Why: {result.reason}_"
    if not calibrated:
        text += ("  \n_This model is not calibrated: its probabilities are the raw softmax and it cannot tell a "
                 "non-car photo apart. `python -m carapp calibrate --run RUN` fixes both._")
    return text


def slider_value(threshold: float) -> float:
    """Where a slider shows a model's threshold: its 0.01 steps inside (0, 1). A calibrated 1.0 ("no threshold
    reaches the target: never name one") shows as 0.99."""
    return float(min(max(round(threshold, 2), 0.01), 0.99))


def moved_thresholds(sent: dict, own: dict) -> dict:
    """Only a slider moved away from the model's own threshold overrides it: a slider left where the model put it
    stands for the exact calibrated value (which may be 1.0, where no slider can go)."""
    return {k: v for k, v in sent.items() if own.get(k) is None or v != slider_value(own[k])}


def model_thresholds(model: str | None, settings: AppSettings):
    """The sliders follow the chosen model's calibrated thresholds."""
    try:
        calibration = host_predictor(resolve_model(model, settings), settings).calibration if model else None
    except Exception:  # a model that cannot load shows its error on Predict; here it only means default sliders
        calibration = None
    thresholds, note = (calibration.thresholds, calibration.note) if calibration else ({}, "")
    return (gr.Slider(value=slider_value(thresholds.get("model", 0.5)), info=note or MODEL_SLIDER_INFO),
            gr.Slider(value=slider_value(thresholds.get("make", 0.5))))


@contextlib.contextmanager
def _heatmap_slot(method: str, settings: AppSettings):
    """gradcam comes with the forward pass; the package methods cost seconds to minutes of CPU, so they run one at
    a time and, on a public app, only where the owner allowed them."""
    if method in ("none", "gradcam"):
        yield
        return
    if not settings.slow_cam_enabled:
        raise gr.Error(f"{method} is turned off on this public app (it costs seconds of CPU per photo); gradcam "
                       f"shows the same kind of heatmap instantly.", print_exception=False)
    if not _SLOW_CAM.acquire(blocking=False):
        raise gr.Error(SLOW_CAM_BUSY, print_exception=False)
    try:
        yield
    finally:
        _SLOW_CAM.release()


def target_choices(model: str | None, settings: AppSettings):
    """The classes of the chosen model, to pick which one the heatmap explains."""
    labels: list[str] = []
    try:
        source = Path(resolve_model(model, settings)) if model else None
        if source and source.is_dir():
            labels = rundir.label_names(source)
        elif source:
            labels = host_predictor(source, settings).labels
    except Exception:  # a model that cannot load shows its error on Predict; here it only means no class list
        labels = []
    return gr.Dropdown(choices=[TOP1, *labels], value=TOP1)


def build(settings: AppSettings, demo: gr.Blocks) -> None:
    with gr.Tab("Predict"):
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard", "webcam"],
                                 label="Photo of a car (classified as soon as it arrives)", elem_id="input-image",
                                 height=360)
                # choices are filled on page load; values are checked by resolve_model
                model = gr.Dropdown(label="Model (run, checkpoint, export or hf://owner/name)", choices=[],
                                    allow_custom_value=True, elem_id="model-choice")
                with gr.Row():
                    methods = CAM_METHODS if settings.slow_cam_enabled else ("gradcam",)
                    method = gr.Dropdown([*methods, "none"], value="gradcam", label="Heatmap method",
                                         info="gradcam is instant" + ("; the others cost seconds of CPU per photo "
                                                                      "(scorecam ~20 s)" if len(methods) > 1 else ""))
                    target = gr.Dropdown([TOP1], value=TOP1, label="Explain class", allow_custom_value=True)
                with gr.Accordion("Answer thresholds", open=False):
                    gr.Markdown("A model or make is named only when its (calibrated) probability reaches these; "
                                "they start at the values chosen on the validation split for 95% accuracy.")
                    with gr.Row():
                        model_threshold = gr.Slider(0.01, 0.99, value=0.5, step=0.01, label="Name the model from",
                                                    info=MODEL_SLIDER_INFO, elem_id="model-threshold")
                        make_threshold = gr.Slider(0.01, 0.99, value=0.5, step=0.01, label="Name the make from")
                    tta = gr.Checkbox(label="Also look at the mirrored photo (flip TTA: a second forward pass)")
                find_cars = gr.Checkbox(value=True, label="Find every car in the photo (the car detector)",
                                        visible=bool(settings.detector_source), elem_id="find-cars")
                button = gr.Button("Classify", variant="primary")
                api_button = gr.Button(visible=False)  # the /predict endpoint: errors as errors, for API clients
                cars_button = gr.Button(visible=False)  # /predict_cars: every car as JSON
                cars_json = gr.JSON(visible=False)
                examples = sorted(EXAMPLES.glob("*.jpg"))
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[image],
                                label="Examples (synthetic demo cars, not photos)")
            with gr.Column():
                model_line = gr.Markdown(elem_id="model-line")
                train_first = gr.Button("Train the demo model (3-5 minutes on a laptop CPU)", visible=False,
                                        variant="primary", elem_id="train-first")
                boxes = gr.AnnotatedImage(label="Cars found (click one)", visible=False, elem_id="cars-found",
                                          height=300)
                car = gr.Radio(label="Car", choices=[], visible=False, elem_id="car-choice")
                views = gr.State([])  # every car's panels, for the chooser
                answer = gr.Markdown(elem_id="answer")
                with gr.Row():
                    label = gr.Label(num_top_classes=5, label="Top 5 models", elem_id="top5")
                    makes = gr.Label(num_top_classes=5, label="Top makes", elem_id="makes")
                cam = gr.Image(label="Where it looked (Grad-CAM)",
                               format="png", elem_id="cam", interactive=False, height=360)
                gr.Markdown("The outlined square is what the network saw; the dimmed margins were cut away.",
                            elem_id="cam-note")
        timer = gr.Timer(5.0, active=False)  # ticks only while the first model is being trained
    inputs = [image, model, method, target, tta, model_threshold, make_threshold]
    outputs = [label, cam, answer, makes]
    fn = lambda img, m=None, meth="gradcam", t=TOP1, a=False, mt=None, kt=None: predict(  # noqa: E731
        img, m, meth, t, a, mt, kt, settings=settings)
    # /predict keeps its seven inputs (a raw caller sends every one): with a detector it answers for the most
    # prominent car, as predict --json's top-level fields do.
    # One pool of 2 for every prediction, the app's and the API's alike (a limit is per event unless they share an id)
    api_button.click(fn, inputs, outputs, api_name="predict", preprocess=False, concurrency_limit=2,
                     concurrency_id="classify")
    cars_button.click(lambda img, m=None: predict_cars(img, m, settings=settings), [image, model], cars_json,
                      api_name="predict_cars", preprocess=False, concurrency_limit=2, concurrency_id="classify")
    moved = gr.State(False)  # a person moved a threshold slider since the model's thresholds arrived
    shown = lambda *values: show_answer(*page_thresholds(*values), settings=settings)  # noqa: E731
    for event in (button.click, image.change):  # an upload, a pasted photo or an example is classified at once
        event(shown, [*inputs, find_cars, moved], [*outputs, boxes, car, views], preprocess=False,
              concurrency_limit=2, concurrency_id="classify", api_visibility="private")
    for slider in (model_threshold, make_threshold):
        slider.input(lambda: True, None, moved, api_visibility="private")
    model.change(lambda: False, None, moved, api_visibility="private")  # at once: a new model, its own thresholds
    car.input(show_car, [car, views], outputs, api_visibility="private")
    boxes.select(clicked_car, views, [car, *outputs], api_visibility="private")
    method.change(cam_label, method, cam, api_visibility="private")
    demo.load(lambda: gr.Dropdown(choices=model_choices(settings), value=default_model(settings)), None, model,
              api_visibility="private")
    demo.load(lambda: first_model_view(settings), None, [model_line, timer, train_first], api_visibility="private")
    train_first.click(lambda: start_first_model(settings), None, [model_line, timer, train_first],
                      api_visibility="private")
    timer.tick(lambda m: first_model_tick(m, settings), model, [model_line, timer, model], api_visibility="private")
    model.change(lambda m: target_choices(m, settings), model, target, api_visibility="private")
    # and again with its thresholds, in one update: a slider moved while the model loads goes back to what the
    # model says, and the page then shows the thresholds it answers with
    model.change(lambda m: (*model_thresholds(m, settings), False), model, [model_threshold, make_threshold, moved],
                 api_visibility="private")
    model.change(lambda m: model_summary(m, settings), model, model_line, api_visibility="private")


def model_summary(model: str | None, settings: AppSettings) -> str:
    """One line about the chosen model: backbone, classes, input size, how well it did."""
    if not model:
        return no_model_message(settings)
    try:
        info = host_predictor(resolve_model(model, settings), settings).describe()
    except Exception:  # a model that cannot load shows its error when a photo is classified
        return ""
    return f"**Model:** {info}"


def first_model_view(settings: AppSettings):
    """On load: the first model's progress while it trains; with no model at all, what to do (the Model box stays
    empty, so its change event never says it)."""
    training = first_model.progress(settings)
    line = training or (no_model_message(settings) if not model_choices(settings) else None)
    return (line or gr.skip(), gr.Timer(active=bool(training)),
            gr.Button(visible=not training and first_model.offered(settings)))


def start_first_model(settings: AppSettings):
    """The Predict tab's button: train the demo preset, show its progress here, pick the model up when ready."""
    if not settings.training_enabled or not first_model.offered(settings):
        raise gr.Error("This app has a model already, or its owner has turned training off.", print_exception=False)
    try:
        first_model.start_now(settings)
    except (jobs.JobError, OSError, ValueError) as exc:
        raise gr.Error(settings.redact(str(exc)), print_exception=False) from None
    return first_model.progress(settings) or "Starting the demo model…", gr.Timer(active=True), gr.Button(visible=False)


def first_model_tick(model: str | None, settings: AppSettings):
    """While the first model trains: its progress; once it is ready, the Model box is filled and the timer stops."""
    line = first_model.progress(settings)
    if line:
        return line, gr.skip(), gr.skip()
    choices = model_choices(settings)
    value = model or (choices[0][1] if choices else None)
    return model_summary(value, settings), gr.Timer(active=False), gr.Dropdown(choices=choices, value=value)
