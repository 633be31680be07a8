"""Images to batches: the ImageFolder tree and its checks, crops, the decoded tile store, the job's splits and loaders."""
