"""The demo's Slides tab: a query slide -> the most similar slides of the index, and where.

Each result slide is shown as a thumbnail with boxes on the tiles that matched the query's
mosaic; clicking a result shows the best-matching pair of tiles side by side (query tile,
matched tile), read at full resolution through the API's region endpoint. Like the patch
tab, everything goes through the API over HTTP (demo/client.py).
"""
from __future__ import annotations

import gradio as gr
from PIL import Image, ImageDraw

from demo.client import ApiError, SearchClient

THUMBNAIL_PX = 320
PAIR_PX = 256  # the side-by-side tiles are shown at most this large


def boxed(thumbnail: Image.Image, scale: float, boxes: list[tuple[int, int]], tile_size: int,
          colour: tuple[int, int, int] = (0, 200, 255)) -> Image.Image:
    """`thumbnail` with a box around each level-0 (x, y) tile of `tile_size` level-0 px."""
    image = thumbnail.copy()
    draw = ImageDraw.Draw(image)
    for x, y in boxes:
        left, top = x / scale, y / scale
        side = max(3.0, tile_size / scale)
        draw.rectangle([left, top, left + side, top + side], outline=colour, width=2)
    return image


def slide_caption(result: dict) -> str:
    return f"#{result['rank']} {result['slide']} · {result['label'] or 'unlabelled'} · score {result['score']:.2f}"


def build_slides_tab(client: SearchClient) -> tuple:
    """The tab's components and events (call inside `gr.Tab`); returns its loader and what it fills."""

    def slide_indexes():
        """Indexes holding slides, and the first one's slides."""
        try:
            names = [i["name"] for i in client.indexes()]
            holding = [(name, client.slides(name)) for name in names]
        except ApiError as exc:
            return gr.Dropdown(choices=[]), gr.Dropdown(choices=[]), f"⚠️ {exc}"
        holding = [(name, slides) for name, slides in holding if slides]
        if not holding:
            return (gr.Dropdown(choices=[]), gr.Dropdown(choices=[]),
                    "No index holds slides: build one from `histoseek data prepare --format slides`.")
        name, slides = holding[0]
        return (gr.Dropdown(choices=[n for n, _ in holding], value=name),
                gr.Dropdown(choices=_slide_choices(slides), value=slides[0]["slide"]), "")

    def pick_index(index: str | None):
        try:
            slides = client.slides(index) if index else []
        except ApiError as exc:
            return gr.Dropdown(choices=[]), f"⚠️ {exc}"
        return gr.Dropdown(choices=_slide_choices(slides), value=slides[0]["slide"] if slides else None), ""

    def search(index: str | None, slide: str | None, k: float):
        if not index or not slide:
            return None, [], "", None, "⚠️ Choose an index and a query slide first."
        try:
            sizes = {s["slide"]: s for s in client.slides(index)}
            answer = client.search_slides(index, slide, int(k))
            query_boxes = sorted({(m["query_x"], m["query_y"]) for r in answer["results"] for m in r["matches"]})
            thumbnail, scale = client.slide_thumbnail(index, slide, THUMBNAIL_PX)
            query = boxed(thumbnail, scale, query_boxes, sizes[slide]["tile_size"], (255, 140, 0))
            gallery = []
            for result in answer["results"]:
                image, scale = client.slide_thumbnail(index, result["slide"], THUMBNAIL_PX)
                boxes = [(m["x"], m["y"]) for m in result["matches"]]
                gallery.append((boxed(image, scale, boxes, sizes[result["slide"]]["tile_size"]), slide_caption(result)))
        except ApiError as exc:
            return None, [], "", None, f"⚠️ **Slide search failed:** {exc}"
        vote = answer["vote"]
        text = f"Majority vote of the {len(answer['results'])} slides: **{vote['label'] or 'none'}**" \
               f" ({vote['share']:.0%}); query mosaic: {answer['query_tiles']} tiles."
        state = {"index": index, "query": slide, "results": answer["results"], "sizes": sizes}
        return query, gallery, text, state, "Click a result to compare its best-matching tiles."

    def compare(state: dict | None, event: gr.SelectData):
        if not state or event.index is None or event.index >= len(state["results"]):
            return None, None, ""
        result = state["results"][event.index]
        if not result["matches"]:
            return None, None, "This slide has no matching tile pair to show."
        match = result["matches"][0]
        size = min(state["sizes"][result["slide"]]["tile_size"], 1024)
        try:
            query = client.slide_region(state["index"], state["query"], match["query_x"], match["query_y"], size)
            found = client.slide_region(state["index"], result["slide"], match["x"], match["y"], size)
        except ApiError as exc:
            return None, None, f"⚠️ {exc}"
        query.thumbnail((PAIR_PX, PAIR_PX))
        found.thumbnail((PAIR_PX, PAIR_PX))
        return (query, found, f"Query tile at ({match['query_x']}, {match['query_y']}) of {state['query']}; "
                f"match at ({match['x']}, {match['y']}) of {result['slide']}, similarity {match['score']:.2f}.")

    gr.Markdown("Choose a slide of an index: its mosaic (a few representative tiles) searches the other slides, "
                "which are ranked by the median of their best tile matches. Boxes mark the matching tiles.")
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                index = gr.Dropdown(label="Index", choices=[], elem_id="slide-index-dropdown")
                slide = gr.Dropdown(label="Query slide", choices=[], elem_id="slide-dropdown")
            k = gr.Slider(1, 20, value=5, step=1, label="slides returned", elem_id="slide-k")
            button = gr.Button("Find similar slides", variant="primary", elem_id="slide-search-button")
            status = gr.Markdown(elem_id="slide-status")
            query = gr.Image(label="Query slide (orange: its tiles that matched)", interactive=False, height=320,
                             elem_id="slide-query")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Most similar slides (blue: matching tiles)", columns=3, height="auto",
                                 interactive=False, elem_id="slide-results")
            vote = gr.Markdown(elem_id="slide-vote")
            with gr.Row():
                query_tile = gr.Image(label="Query tile", interactive=False, height=260, elem_id="slide-query-tile")
                match_tile = gr.Image(label="Matched tile", interactive=False, height=260, elem_id="slide-match-tile")
            pair = gr.Markdown(elem_id="slide-pair")
    state = gr.State(None)
    refresh = gr.Button("↻ Refresh slides", size="sm", elem_id="slide-refresh")
    refresh.click(slide_indexes, outputs=[index, slide, status])
    index.input(pick_index, inputs=index, outputs=[slide, status])
    button.click(search, inputs=[index, slide, k], outputs=[query, gallery, vote, state, status])
    gallery.select(compare, inputs=state, outputs=[query_tile, match_tile, pair])
    return slide_indexes, (index, slide, status)


def _slide_choices(slides: list[dict]) -> list[tuple[str, str]]:
    return [(f"{s['slide']} ({s['label']})", s["slide"]) for s in slides]
