"""The demo's Text tab: describe what to find, see the indexed patches nearest the text.

Works on indexes whose encoder has a text tower (HistoSeek's `clip`, CONCH, PLIP, QuiltNet);
for any other index the API's own sentence says which encoders do. The prompts the index's
text tower was trained on are offered as examples: a tower trained here from random
weights (`clip`'s cpu preset) knows those, not free English. Like the other tabs,
everything goes through the API over HTTP (demo/client.py).
"""
from __future__ import annotations

import time

import gradio as gr
from PIL import Image

from demo.client import ApiError, Hit, SearchClient

_MISSING = Image.new("RGB", (64, 64), (200, 200, 200))


def _caption(hit: Hit) -> str:
    return f"#{hit.rank} {hit.label or 'unlabelled'} · similarity {hit.score:.2f}"


def build_text_tab(client: SearchClient) -> tuple:
    """The tab's components and events (call inside `gr.Tab`); returns its loader and what it fills."""

    def load_indexes():
        try:
            names = [i["name"] for i in client.indexes()]
        except ApiError as exc:
            return gr.Dropdown(choices=[]), gr.Dropdown(choices=[]), f"⚠️ {exc}"
        if not names:
            return gr.Dropdown(choices=[]), gr.Dropdown(choices=[]), "⚠️ The search API has no indexes."
        prompts, status = pick_index(names[0])
        return gr.Dropdown(choices=names, value=names[0]), prompts, status

    def pick_index(index: str | None):
        """The index's trained prompts as examples, or the API's reason why it has none."""
        if not index:
            return gr.Dropdown(choices=[], value=None), ""
        try:
            prompts = client.text_prompts(index)
        except ApiError as exc:
            return gr.Dropdown(choices=[], value=None), f"⚠️ {exc}"
        choices = [(f"{label}: {prompt}", prompt) for label, prompt in prompts.items()]
        note = "" if choices else "This index's text tower records no training prompts: type any description."
        return gr.Dropdown(choices=choices, value=None), note

    def search(text: str, index: str | None, k: float):
        if not index:
            return [], "", "⚠️ Choose an index first."
        if not (text or "").strip():
            return [], "", "⚠️ Type a description, or pick one of the index's prompts."
        try:
            started = time.perf_counter()
            answer = client.search_text(text, index, int(k))
            hits = client.thumbnails(answer["results"])
            seconds = time.perf_counter() - started
        except ApiError as exc:
            return [], "", f"⚠️ **Text search failed:** {exc}"
        gallery = [(hit.image if hit.image is not None else _MISSING, _caption(hit)) for hit in hits]
        vote = answer.get("vote") or {}
        agreeing = sum(r.get("label") == vote.get("label") for r in answer["results"])
        summary = (f"Majority label: **{vote['label']}** ({agreeing}/{len(hits)})" if vote.get("label")
                   else "No labelled results.")
        return gallery, summary, f"{len(hits)} results from index `{index}` in {seconds * 1000:.0f} ms."

    gr.Markdown("Describe the tissue you look for; the index's text tower embeds the words in the same space as "
                "the images. Indexes of encoders with a text tower only (`clip`, CONCH, PLIP, QuiltNet).")
    with gr.Row():
        with gr.Column(scale=2):
            index = gr.Dropdown(label="Index", choices=[], elem_id="text-index-dropdown")
            prompts = gr.Dropdown(label="Prompts this index's text tower was trained on", choices=[],
                                  elem_id="text-prompts")
            text = gr.Textbox(label="Text", placeholder="a histopathology image of tubular adenoma", max_length=1000,
                              elem_id="text-query")
            k = gr.Slider(1, 50, value=10, step=1, label="k (number of results)", elem_id="text-k")
            button = gr.Button("Search by text", variant="primary", elem_id="text-search-button")
            status = gr.Markdown(elem_id="text-status")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Patches nearest the text", columns=4, height="auto", object_fit="cover",
                                 interactive=False, elem_id="text-results")
            vote = gr.Markdown(elem_id="text-vote")
    refresh = gr.Button("↻ Refresh indexes", size="sm", elem_id="text-refresh")
    refresh.click(load_indexes, outputs=[index, prompts, status])
    index.input(pick_index, inputs=index, outputs=[prompts, status])
    prompts.input(lambda chosen: chosen or "", inputs=prompts, outputs=text)
    button.click(search, inputs=[text, index, k], outputs=[gallery, vote, status])
    text.submit(search, inputs=[text, index, k], outputs=[gallery, vote, status])
    return load_indexes, (index, prompts, status)
