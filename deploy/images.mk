# Container images (included by the top-level Makefile: `include deploy/images.mk`).
# Needs a Docker engine with BuildKit. Override IMAGE_REPO and IMAGE_TAG, e.g.
#   make images-push IMAGE_REPO=ghcr.io/acme IMAGE_TAG=1.4.0
# then point the cluster at them (k8s/README.md, "Images").
IMAGE_REPO ?= localhost:5000
IMAGE_TAG  ?= 0.1.0
IMAGE_CPU  := $(IMAGE_REPO)/rlhf-platform:$(IMAGE_TAG)
IMAGE_CUDA := $(IMAGE_REPO)/rlhf-platform-cuda:$(IMAGE_TAG)

.PHONY: images image-cpu image-cuda images-push

images: image-cpu image-cuda ## build the CPU and CUDA container images

image-cpu: ## build the CPU image (services, controller, CPU trainers)
	docker build -f deploy/Dockerfile --build-arg TORCH_FLAVOR=cpu -t $(IMAGE_CPU) .

image-cuda: ## build the CUDA image (GPU trainers and GPU serving)
	docker build -f deploy/Dockerfile --build-arg TORCH_FLAVOR=cuda -t $(IMAGE_CUDA) .

images-push: images ## push both images to $(IMAGE_REPO)
	docker push $(IMAGE_CPU)
	docker push $(IMAGE_CUDA)
