# padim-ray on the official Ray GPU image: Ray 2.60.0, Python 3.11, CUDA; the KubeRay manifests in
# cluster/ run this image. Build from the repository root and push to your registry:
#
#   docker build -t REGISTRY/padim-ray:0.1.0 .
#   docker push REGISTRY/padim-ray:0.1.0
#
# REGISTRY is yours (e.g. 123456789012.dkr.ecr.us-west-2.amazonaws.com or
# us-docker.pkg.dev/my-project/padim); the tag is the package version in pyproject.toml.
# Keep the base tag at the Ray version the package is tested with (tests/test_cluster_configs.py
# checks it against the installed Ray).
FROM rayproject/ray:2.60.0-py311-gpu

# The base image runs as user `ray` (uid 1000, gid 100) with Python in /home/ray/anaconda3.
WORKDIR /home/ray/padim-ray
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 padim_ray ./padim_ray
# Ray is pinned to the base image's version so pip never replaces it.
RUN pip install --no-cache-dir . "ray[data,default]==2.60.0" \
    && padim-ray --help > /dev/null
WORKDIR /home/ray
