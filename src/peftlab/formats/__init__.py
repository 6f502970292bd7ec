"""On-disk adapter formats. LoRA and DoRA use Hugging Face PEFT's format exactly."""
