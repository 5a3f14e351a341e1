"""Zero-shot detectors of HF transformers with random weights, small, saved with their processors to a folder
(`save_pretrained`) as a user's local detector would be: no weights, tokenizer or processor file is downloaded.
The vocabularies are made here (a WordPiece one for Grounding DINO's BERT, a byte-pair one for OWL's CLIP)."""

import json
from pathlib import Path

import torch

WORDS = ("a", "an", "the", "dog", "cat", "person", "car", "bicycle", "coffee", "cup", "rocket")


def grounding_dino(folder: Path, seed: int = 0, mm: bool = False) -> Path:
    """A Grounding DINO (Swin backbone, BERT text encoder) of about 160k parameters; with `mm` an MM Grounding
    DINO (the same processor, the model of its own class)."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        MMGroundingDinoConfig,
        MMGroundingDinoForObjectDetection,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=BertTokenizer(str(folder / "vocab.txt")),
    )
    config_class, model_class = (
        (MMGroundingDinoConfig, MMGroundingDinoForObjectDetection)
        if mm
        else (GroundingDinoConfig, GroundingDinoForObjectDetection)
    )
    config = config_class(
        backbone_config=SwinConfig(
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=4,
            image_size=64,
            out_features=["stage2", "stage3", "stage4"],  # pyright: ignore[reportCallIssue]  (a backbone keyword)
        ),
        text_config=BertConfig(
            vocab_size=len(vocabulary),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=20,
        encoder_n_points=1,
        decoder_n_points=1,
        max_text_len=32,
    )
    torch.manual_seed(seed)
    model_class(config).save_pretrained(folder)  # pyright: ignore[reportArgumentType]  # the config class goes with the model class
    processor.save_pretrained(folder)
    return folder


def _clip_vocabulary(folder: Path) -> tuple[Path, Path, int]:
    """A CLIP byte-pair vocabulary of the test words (whole words, and single letters for any other word)
    without merges; the begin and end tokens last (OWL pools the text at the highest id), padding at 0 (OWL
    masks out queries whose first token is 0)."""
    vocabulary = {"!": 0}
    for word in WORDS:
        vocabulary[f"{word}</w>"] = len(vocabulary)
    for letter in "abcdefghijklmnopqrstuvwxyz.":
        vocabulary.setdefault(letter, len(vocabulary))
        vocabulary.setdefault(f"{letter}</w>", len(vocabulary))
    vocabulary["<|startoftext|>"] = len(vocabulary)
    vocabulary["<|endoftext|>"] = len(vocabulary)
    (folder / "vocab.json").write_text(json.dumps(vocabulary))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder / "vocab.json", folder / "merges.txt", len(vocabulary)


def owl(folder: Path, version: int = 2, seed: int = 0) -> Path:
    """An OWLv2 (`version` 2) or OWL-ViT (1) of a 64-pixel ViT with 16-pixel patches (16 boxes)."""
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2Processor,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTProcessor,
    )
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges, size = _clip_vocabulary(folder)
    tokenizer = CLIPTokenizer(str(vocab), str(merges), pad_token="!")
    text = {
        "vocab_size": size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "bos_token_id": size - 2,
        "eos_token_id": size - 1,
        "pad_token_id": 0,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 64,
        "patch_size": 16,
    }
    image_size = {"height": 64, "width": 64}
    torch.manual_seed(seed)
    if version == 2:
        Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(
            folder
        )
        processor = Owlv2Processor(image_processor=Owlv2ImageProcessorPil(size=image_size), tokenizer=tokenizer)
    else:
        OwlViTForObjectDetection(
            OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32)
        ).save_pretrained(folder)
        processor = OwlViTProcessor(
            image_processor=OwlViTImageProcessorPil(size=image_size, crop_size=image_size), tokenizer=tokenizer
        )
    processor.save_pretrained(folder)
    return folder


BUILDERS = {
    "grounding_dino": grounding_dino,
    "mm_grounding_dino": lambda folder: grounding_dino(folder, mm=True),
    "owlv2": lambda folder: owl(folder, 2),
    "owlvit": lambda folder: owl(folder, 1),
}
