"""Flickr30k Entities readers, entity selection, phrase positions and IoU targets, on a
hand-written caption and XML pair in the real formats (docs/reference.md, grounding)."""

import numpy as np
import pytest

from ban.data import flickr

# A multi-type phrase (his arm), a notvisual phrase (id 0), an object with two <name>s (10, 11),
# a chain with two boxes (14), a scene=1 chain (12), a nobndbox=1 chain (15), commas before
# phrases, a repeated phrase (a dog), a scene-TYPE phrase with a box (16), a caption with none.
SENTENCES = (
    "[/EN#10/people A man] , [/EN#0/notvisual each other] , [/EN#11/bodyparts/people his arm] "
    "and [/EN#13/other a dog] near [/EN#12/scene the subway] with [/EN#14/other two balls] , "
    "[/EN#15/other a ghost] and [/EN#13/other a dog] .\n"
    "[/EN#16/scene The street] is empty .\n"
    "[/EN#0/notvisual Nothing] here .\n"
)

XML = """<annotation>
\t<filename>100.jpg</filename>
\t<size>
\t\t<width>200</width>
\t\t<height>200</height>
\t\t<depth>3</depth>
\t</size>
\t<object>
\t\t<name>10</name>
\t\t<name>11</name>
\t\t<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>50</xmax><ymax>100</ymax></bndbox>
\t</object>
\t<object>
\t\t<name>13</name>
\t\t<bndbox><xmin>60</xmin><ymin>60</ymin><xmax>90</xmax><ymax>90</ymax></bndbox>
\t</object>
\t<object>
\t\t<name>14</name>
\t\t<bndbox><xmin>100</xmin><ymin>10</ymin><xmax>120</xmax><ymax>30</ymax></bndbox>
\t</object>
\t<object>
\t\t<name>14</name>
\t\t<bndbox><xmin>130</xmin><ymin>10</ymin><xmax>150</xmax><ymax>30</ymax></bndbox>
\t</object>
\t<object>
\t\t<name>16</name>
\t\t<bndbox><xmin>1</xmin><ymin>150</ymin><xmax>200</xmax><ymax>200</ymax></bndbox>
\t</object>
\t<object>
\t\t<name>12</name>
\t\t<nobndbox>0</nobndbox>
\t\t<scene>1</scene>
\t</object>
\t<object>
\t\t<name>15</name>
\t\t<nobndbox>1</nobndbox>
\t\t<scene>0</scene>
\t</object>
</annotation>
"""

PROPOSALS = np.array(
    [
        [0, 0, 50, 100],  # IoU 0.97 with the man's (and arm's) box
        [60, 60, 90, 90],  # the dog's box
        [100, 10, 120, 30],  # the first ball
        [130, 10, 150, 30],  # the second ball
        [100, 10, 150, 30],  # the balls' union box: IoU 0.4 with each ball
        [60, 60, 90, 120],  # IoU exactly 0.5 with the dog's box
    ],
    dtype=np.float32,
)


@pytest.fixture
def image(tmp_path):
    root = tmp_path / "flickr30k"
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "Sentences" / "100.txt").write_text(SENTENCES, encoding="utf-8")
    (root / "Annotations" / "100.xml").write_text(XML, encoding="utf-8")
    return root


def test_caption_markup_is_parsed_as_the_official_reader():
    caption = flickr.parse_caption(SENTENCES.splitlines()[0])
    assert caption.words[:8] == ["A", "man", ",", "each", "other", ",", "his", "arm"]
    got = [(p.text, p.first_word_index, p.chain_id, p.types) for p in caption.phrases]
    assert got == [
        ("A man", 0, 10, ["people"]),
        ("each other", 3, 0, ["notvisual"]),
        ("his arm", 6, 11, ["bodyparts", "people"]),
        ("a dog", 9, 13, ["other"]),
        ("the subway", 12, 12, ["scene"]),
        ("two balls", 15, 14, ["other"]),
        ("a ghost", 18, 15, ["other"]),
        ("a dog", 21, 13, ["other"]),
    ]
    with pytest.raises(ValueError, match="not closed"):
        flickr.parse_caption("[/EN#1/people a man")


def test_xml_boxes_every_name_raw_coordinates_and_flags(image):
    ann = flickr.read_annotation(image / "Annotations" / "100.xml")
    assert (ann.width, ann.height) == (200, 200)
    assert ann.boxes[10] == ann.boxes[11] == [[1, 1, 50, 100]]  # both names get the box, 1-based
    assert ann.boxes[14] == [[100, 10, 120, 30], [130, 10, 150, 30]]
    assert 12 not in ann.boxes and ann.scene == {12}
    assert 15 not in ann.boxes and ann.nobox == {15}


def test_evaluated_phrases_are_those_whose_chain_has_a_box(image):
    records, counts = flickr.caption_records(image, [100])
    assert counts == {"images": 1, "captions": 3, "phrases": 10, "evaluated_phrases": 6}
    assert [r["caption"] for r in records] == [0, 1]  # the caption with no entity is dropped
    first = records[0]["entities"]
    assert [(e["text"], e["chain_id"]) for e in first] == [
        ("A man", 10),
        ("his arm", 11),
        ("a dog", 13),
        ("two balls", 14),
        ("a dog", 13),
    ]
    assert records[1]["entities"][0]["types"] == ["scene"]  # a scene-type phrase with a box


def test_too_many_phrases_in_a_caption_is_an_error():
    line = " ".join(f"[/EN#{i}/other thing{i}]" for i in range(1, 18))
    caption = flickr.parse_caption(line)
    ann = flickr.ImageAnnotation(10, 10, {i: [[1, 1, 5, 5]] for i in range(1, 18)})
    with pytest.raises(ValueError, match="at most 16"):
        flickr.entities(caption, ann)


def test_phrase_positions_clean_and_compat(image):
    records, _ = flickr.caption_records(image, [100])
    words, ents = records[0]["words"], records[0]["entities"]
    # clean: the true last token in the tokenizer's output (commas deleted)
    assert flickr.phrase_positions(words, ents) == [1, 5, 8, 14, 19]
    # compat: first occurrence in the raw split (commas counted), so the repeated "a dog" -> 10
    assert flickr.phrase_positions(words, ents, compat=True) == [1, 7, 10, 16, 10]


def test_compat_positions_are_capped_to_82_tokens():
    words = ["w"] * 90 + ["a", "cat"]
    assert flickr.phrase_positions(words, [{"text": "a cat", "first_word_index": 90}], True) == [81]
    assert flickr.phrase_positions(words, [{"text": "a cat", "first_word_index": 90}]) == [91]


def test_iou_has_no_plus_one_and_threshold_is_inclusive():
    assert flickr.iou([[0, 0, 10, 10]], [[5, 0, 15, 10]])[0, 0] == pytest.approx(50 / 150)
    assert flickr.iou([[0, 0, 10, 10]], [[20, 20, 30, 30]])[0, 0] == 0
    assert flickr.iou([[60, 60, 90, 120]], [[60, 60, 90, 90]])[0, 0] == 0.5


def test_targets_any_and_merged(image):
    records, _ = flickr.caption_records(image, [100])
    gt = [np.array(e["boxes"]) for e in records[0]["entities"]]
    any_ = flickr.targets(PROPOSALS, gt, "any").astype(int).tolist()
    assert any_ == [
        [1, 0, 0, 0, 0, 0],  # a man
        [1, 0, 0, 0, 0, 0],  # his arm (the shared box)
        [0, 1, 0, 0, 0, 1],  # a dog (IoU 0.5 counts)
        [0, 0, 1, 1, 0, 0],  # two balls: either box
        [0, 1, 0, 0, 0, 1],
    ]
    merged = flickr.targets(PROPOSALS, gt, "merged").astype(int).tolist()
    assert merged[3] == [0, 0, 0, 0, 1, 0]  # only the union box matches the merged ground truth
    assert merged[:3] == any_[:3]
    with pytest.raises(ValueError, match="protocol"):
        flickr.targets(PROPOSALS, gt, "union")
    uncovered = flickr.targets(PROPOSALS, [np.array([[180, 180, 199, 199]])])
    assert not uncovered.any()  # no positive proposal: an all-zero row, still a phrase


def test_split_file(tmp_path):
    (tmp_path / "val.txt").write_text("100\n200\n\n")
    assert flickr.read_split(tmp_path / "val.txt") == [100, 200]
