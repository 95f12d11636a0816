"""Commands: data preparation (prepare-latents)."""

from __future__ import annotations

from typing import Optional

import typer

from dimr_lab.cli import app


@app.command("prepare-latents")
def prepare_latents_cmd(
    src: str = typer.Argument(..., help="ImageFolder tree: SRC/<class>/<image>"),
    out: str = typer.Argument(..., help="output folder for {idx}.npy files (the released DiMR layout)"),
    vae: Optional[str] = typer.Option(None, "--vae", help="required: a local diffusers AutoencoderKL folder "
                                                          "(Stable Diffusion's VAE)"),
    image_size: int = typer.Option(256, "--image-size", min=8, help="centre-crop and resize images to this side"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="images encoded at a time"),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="also store every image's horizontal flip"),
) -> None:
    """Encode an image folder into VAE latents (moments + label per file, flips included)."""
    from dimr_lab.errors import UserError

    if not vae:
        raise UserError("--vae PATH is required: a local diffusers AutoencoderKL folder (no downloads here)")
    from dimr_lab.data import prepare_latents

    meta = prepare_latents(src, out, vae=vae, image_size=image_size, batch_size=batch_size, flip=flip)
    typer.echo(f"wrote {meta['count']} latent files ({meta['channels']}x{meta['latent_size']}x{meta['latent_size']}, "
               f"{meta['num_classes']} classes) to {out}")
