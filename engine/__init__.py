"""Networks, per-frame latent composition and runtimes. Imports nothing heavy at package import."""
