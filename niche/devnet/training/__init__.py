"""Brief CPU training of the tiny checkpoints on procedural shapes (`niche models train-tiny`).

Tiny random-weight models ignore their prompt and barely react to steps, so a verifier tuned on
them would be tuned on noise. These modules train each tiny component with its real objective
(autoencoding for the VAEs, rectified flow for FLUX, diffusion for Kolors and its ControlNets /
IP-Adapter: v prediction for the tiny UNet, epsilon in real Kolors) until the images react to
prompt, seed, steps and conditioning the way real models do; the results are committed under
niche/devnet/tiny_weights/ and loaded by niche/devnet/tiny.py. See docs/tiny-models.md.
"""
