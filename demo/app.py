"""The Gradio web demo: upload an H&E patch, see the k most similar indexed patches, mark
results "like these" / "not like these" and search again (the marks of every round are kept
by the page and sent with each refinement: the API keeps nothing); or choose a whole slide
and see the most similar slides (the Slides tab, demo/slides_tab.py); or describe the tissue in
words (the Text tab, demo/text_tab.py, for indexes whose encoder has a text tower).

It talks to the search API over HTTP only (`demo/client.py`) and fetches the result
thumbnails server-side, so the browser needs to reach the demo and nothing else.
Errors, the API being down included, are shown in the status box as plain sentences.
"""
from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
from PIL import Image

from demo.client import ApiError, Hit, SearchClient
from demo.slides_tab import build_slides_tab
from demo.text_tab import build_text_tab

EXAMPLES_DIR = Path(__file__).parent / "examples"
# System fonts only: the default theme loads Google Fonts, which a hospital or offline
# network may not reach (the page then waits on the font request).
THEME = gr.themes.Default(primary_hue="pink", font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])
# Gallery captions are cut to one line by default, which hides the similarity: let them wrap.
CSS = """#results-gallery .caption-label { white-space: normal; max-width: none; left: var(--block-label-margin);
  opacity: 0.9; }
#status p { margin: 0; } #vote { font-size: 1.1em; }"""
TIMING_STAGES = ("decode", "preprocess", "embed", "search", "total")
_MISSING = Image.new("RGB", (64, 64), (200, 200, 200))  # stands in for a thumbnail that failed


def caption(hit: Hit) -> str:
    """`#3 tumour · similarity 0.93`, as shown under each gallery image."""
    return f"#{hit.rank} {hit.label or 'unlabelled'} · similarity {hit.score:.2f}" + \
        ("" if hit.image is not None else " (no thumbnail)")


def vote_text(answer: dict) -> str:
    results, vote = answer["results"], answer.get("vote") or {}
    if not results:
        return "No results."
    if not vote.get("label"):
        return "Majority vote: none (the results carry no labels)."
    agreeing = sum(r.get("label") == vote["label"] for r in results)
    return f"Majority vote: **{vote['label']}** ({agreeing}/{len(results)})"


def timings_text(answer: dict, thumbnails_ms: float) -> str:
    timings = answer.get("timings_ms") or {}
    cells = [f"{timings[s]:.1f}" if isinstance(timings.get(s), (int, float)) else "–" for s in TIMING_STAGES]
    return ("Search API timings (ms)\n\n| " + " | ".join(TIMING_STAGES) + " |\n|" + "---:|" * len(TIMING_STAGES)
            + "\n| " + " | ".join(cells) + f" |\n\nThumbnails fetched by the demo in {thumbnails_ms:.0f} ms.")


def _error(message: str, what: str = "Error") -> str:
    return f"⚠️ **{what}:** {message}"


def build_demo(api_url: str, api_key: str | None = None) -> gr.Blocks:
    client = SearchClient(api_url, api_key=api_key)
    labels_of: dict[str, list[str]] = {}  # index name -> its labels, as last listed by the API

    def refresh_indexes(current: str | None):
        try:
            indexes = client.indexes()
        except ApiError as exc:
            return gr.Dropdown(choices=[], value=None), _error(str(exc), "Could not list the indexes")
        choices = [(f"{i['name']} ({i.get('encoder', '?')}, {i.get('count', '?')} items)", i["name"])
                   for i in indexes]
        labels_of.clear()
        labels_of.update({i["name"]: list(i.get("labels") or []) for i in indexes})
        names = [name for _, name in choices]
        value = current if current in names else (names[0] if names else None)
        status = "" if names else _error("The search API has no indexes: build one with `histoseek index build`.")
        return gr.Dropdown(choices=choices, value=value), status

    def label_choices(index: str | None):
        # A new index has other labels: the filter starts empty (all labels) again.
        return gr.Dropdown(choices=labels_of.get(index or "", []), value=[])

    def shown(answer: dict, index: str, status: str, marks: dict) -> tuple:
        """The outputs of a search or a refinement: gallery, vote, timings, status, the two
        mark lists offering the new results (ticked where already marked), and the marks."""
        started = time.perf_counter()
        hits = client.thumbnails(answer["results"])
        thumbnails_ms = (time.perf_counter() - started) * 1000
        gallery = [(hit.image if hit.image is not None else _MISSING, caption(hit)) for hit in hits]
        choices = [(f"#{hit.rank} {hit.label or 'unlabelled'} (id {hit.id})", hit.id) for hit in hits]
        ids = [hit.id for hit in hits]
        marks = {**marks, "shown": ids}
        return (gallery, vote_text(answer), timings_text(answer, thumbnails_ms), status,
                gr.CheckboxGroup(choices=choices, value=[i for i in ids if i in marks["relevant"]]),
                gr.CheckboxGroup(choices=choices, value=[i for i in ids if i in marks["not_relevant"]]), marks)

    def failed(message: str, marks: dict) -> tuple:
        return [], "", "", message, *unmarked(marks)

    def unmarked(marks: dict) -> tuple:
        """Empty mark lists (nothing on screen to mark) and `marks`."""
        return gr.CheckboxGroup(choices=[], value=[]), gr.CheckboxGroup(choices=[], value=[]), marks

    def forget_marks():
        # Marks hold item ids of one index for one query: another image or index starts afresh.
        return unmarked({"relevant": [], "not_relevant": [], "shown": [], "index": None})

    def search(image: Image.Image | None, index: str | None, k: float, labels: list[str] | None = None):
        fresh = {"relevant": [], "not_relevant": [], "shown": [], "index": index}  # a new search forgets marks
        if image is None:
            return failed(_error("Upload an image or pick an example first."), fresh)
        try:
            if not index:  # the list was empty at page load (API down then?): ask again
                names = [i["name"] for i in client.indexes()]
                if not names:
                    raise ApiError("The search API has no indexes: build one with `histoseek index build`.")
                index = names[0]
            answer = client.search(image, index, int(k), labels=labels or None)
            among = f" labelled {', '.join(labels)}" if labels else ""
            fresh["index"] = index
            return shown(answer, index, f"{len(answer['results'])} results{among} from index `{index}`.", fresh)
        except ApiError as exc:
            return failed(_error(str(exc), "Search failed"), fresh)
        except (KeyError, TypeError, ValueError) as exc:  # an answer that breaks the contract
            return failed(_error(f"the search API sent an answer the demo does not understand ({exc!r}).",
                                 "Search failed"), fresh)

    def refine(image: Image.Image | None, index: str | None, k: float, labels: list[str] | None,
               liked: list[str], unliked: list[str], marks: dict):
        """Search again with the marks of every round so far: the server keeps nothing, the
        page does (a result unticked now is unmarked)."""
        on_screen = set(marks.get("shown", []))
        relevant = sorted((set(marks.get("relevant", [])) - on_screen) | set(liked or []))
        not_relevant = sorted((set(marks.get("not_relevant", [])) - on_screen) | set(unliked or []))
        keep = {**marks, "relevant": relevant, "not_relevant": not_relevant}
        if image is None or not index or marks.get("index") != index:
            return failed(_error("Search first, then mark results and search again."), keep)
        if not relevant and not not_relevant:
            return failed(_error("Tick results under “Like these” or “Not like these” first."), keep)
        try:
            answer = client.refine(image, index, int(k), relevant, not_relevant, labels=labels or None)
            return shown(answer, index, f"{len(answer['results'])} results, refined with {len(relevant)} liked and "
                                        f"{len(not_relevant)} not liked, from index `{index}`.", keep)
        except ApiError as exc:
            return failed(_error(str(exc), "Refining failed"), keep)
        except (KeyError, TypeError, ValueError) as exc:
            return failed(_error(f"the search API sent an answer the demo does not understand ({exc!r}).",
                                 "Refining failed"), keep)

    with gr.Blocks(title="HistoSeek", analytics_enabled=False) as blocks:
        gr.Markdown("# HistoSeek\nGive it an H&E patch and it finds the most similar patches of an indexed "
                    "collection, with their labels, so similar cases can be compared side by side.")
        with gr.Tabs():
            with gr.Tab("Patches", id="patches"):
                with gr.Row():
                    with gr.Column(scale=2):
                        image = gr.Image(type="pil", label="Query patch", sources=["upload", "clipboard"], height=260,
                                         elem_id="query-image")
                        gr.Examples([[str(p)] for p in sorted(EXAMPLES_DIR.glob("*.png"))], inputs=image,
                                    label="Examples (real colorectal H&E tiles from another collection)", elem_id="examples")
                        with gr.Row(equal_height=True):
                            index = gr.Dropdown(label="Index", choices=[], scale=5, elem_id="index-dropdown")
                            refresh = gr.Button("↻ Refresh", size="sm", scale=1, min_width=60, elem_id="refresh-indexes")
                        k = gr.Slider(1, 50, value=8, step=1, label="k (number of results)", elem_id="k-slider")
                        labels = gr.Dropdown(label="Only these labels (empty: all)", choices=[], value=[],
                                             multiselect=True, elem_id="label-filter")
                        button = gr.Button("Search", variant="primary", elem_id="search-button")
                        status = gr.Markdown(elem_id="status")
                    with gr.Column(scale=3):
                        gallery = gr.Gallery(label="Most similar patches", columns=4, height="auto", object_fit="cover",
                                             interactive=False, elem_id="results-gallery")
                        vote = gr.Markdown(elem_id="vote")
                        with gr.Row():
                            liked = gr.CheckboxGroup(label="Like these", choices=[], elem_id="mark-relevant")
                            unliked = gr.CheckboxGroup(label="Not like these", choices=[], elem_id="mark-not-relevant")
                        again = gr.Button("Search again with these marks", elem_id="refine-button")
                        marks = gr.State({"relevant": [], "not_relevant": [], "shown": [], "index": None})
                        timings = gr.Markdown(elem_id="timings")
            with gr.Tab("Slides", id="slides", elem_id="slides-tab"):
                load_slides, slide_outputs = build_slides_tab(client)
            with gr.Tab("Text", id="text", elem_id="text-tab"):
                load_text, text_outputs = build_text_tab(client)
        blocks.load(refresh_indexes, inputs=index, outputs=[index, status]).then(
            label_choices, inputs=index, outputs=labels)
        blocks.load(load_slides, outputs=list(slide_outputs))
        blocks.load(load_text, outputs=list(text_outputs))
        refresh.click(refresh_indexes, inputs=index, outputs=[index, status]).then(
            label_choices, inputs=index, outputs=labels)
        index.input(label_choices, inputs=index, outputs=labels)
        results = [gallery, vote, timings, status, liked, unliked, marks]
        button.click(search, inputs=[image, index, k, labels], outputs=results)
        again.click(refine, inputs=[image, index, k, labels, liked, unliked, marks], outputs=results)
        image.change(forget_marks, outputs=[liked, unliked, marks])
        index.change(forget_marks, outputs=[liked, unliked, marks])
    return blocks


def launch(api_url: str, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
           api_key: str | None = None) -> gr.Blocks:
    """Serve the demo; with block=False it returns at once (tests; stop it with `.close()`).

    The API key stays on the server side of the demo: the browser never sees it.
    """
    blocks = build_demo(api_url, api_key)
    blocks.queue(default_concurrency_limit=4)
    blocks.launch(server_name=host, server_port=port, prevent_thread_lock=not block, theme=THEME, css=CSS,
                  ssr_mode=False, allowed_paths=[str(EXAMPLES_DIR)], show_error=False, quiet=not block)
    return blocks
