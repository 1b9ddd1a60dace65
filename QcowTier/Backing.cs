namespace QcowTier;

/// <summary>Which backing files an image may make us open (<see cref="QcowOpenOptions.BackingPolicy"/>).</summary>
public enum QcowBackingPolicy
{
    /// <summary>Open the backing file the image names, wherever it is (QEMU's behaviour). Relative names are resolved against the image's folder.</summary>
    Follow,

    /// <summary>Open backing files only when their real path (symbolic links resolved) lies inside <see cref="QcowOpenOptions.BackingRoot"/> (default: the image's folder).</summary>
    WithinRoot,

    /// <summary>Refuse images that have a backing file: use this for untrusted images.</summary>
    Refuse,

    /// <summary>
    /// Do not open the backing file (qemu-img info's BDRV_O_NO_BACKING): clusters not allocated in the image
    /// read as zeroes. Such an image refuses guest writes, which would need the backing data.
    /// </summary>
    Ignore,
}

/// <summary>Why a backing file could not be used.</summary>
public enum QcowBackingError
{
    /// <summary>The backing file does not exist or cannot be opened.</summary>
    NotFound,

    /// <summary>The chain comes back to a file already in it (same device and inode).</summary>
    Loop,

    /// <summary>The chain is deeper than <see cref="QcowImage.MaxBackingDepth"/>.</summary>
    TooDeep,

    /// <summary>The open options' <see cref="QcowBackingPolicy"/> does not allow this backing file.</summary>
    Refused,

    /// <summary>The name is a protocol or json: name (nbd:, http:, json:{...}), which QcowTier never follows.</summary>
    Protocol,

    /// <summary>The backing format is not qcow2 or raw, or the file is not in the format the image says.</summary>
    Format,
}

/// <summary>A backing file could not be used; nothing was read from it.</summary>
public sealed class QcowBackingFileException : QcowException
{
    /// <summary>Creates the exception.</summary>
    public QcowBackingFileException() { }

    /// <summary>Creates the exception with a message.</summary>
    /// <param name="message">What went wrong.</param>
    public QcowBackingFileException(string message) : base(message) { }

    /// <summary>Creates the exception with a message and an inner exception.</summary>
    /// <param name="message">What went wrong.</param>
    /// <param name="inner">The cause.</param>
    public QcowBackingFileException(string message, Exception inner) : base(message, inner) { }

    /// <summary>Creates the exception naming the image, its backing file and the reason.</summary>
    /// <param name="message">What went wrong.</param>
    /// <param name="imageFileName">The image that names the backing file.</param>
    /// <param name="backingFileName">The backing file's name as stored in the image.</param>
    /// <param name="reason">Why it could not be used.</param>
    /// <param name="inner">The cause, or null.</param>
    public QcowBackingFileException(string message, string? imageFileName, string? backingFileName, QcowBackingError reason, Exception? inner = null)
        : base(message, inner!)
    {
        ImageFileName = imageFileName;
        BackingFileName = backingFileName;
        Reason = reason;
    }

    /// <summary>The image that names the backing file.</summary>
    public string? ImageFileName { get; }

    /// <summary>The backing file's name as stored in the image.</summary>
    public string? BackingFileName { get; }

    /// <summary>Why it could not be used.</summary>
    public QcowBackingError Reason { get; }
}

/// <summary>One image below the top of a backing chain.</summary>
/// <param name="Depth">1 for the image's backing file, 2 for its backing file's, and so on (qemu-img map's depth).</param>
/// <param name="FileName">The path it was opened by: the name stored in the layer above, combined with that layer's folder as QEMU does.</param>
/// <param name="Format">"qcow2" or "raw".</param>
/// <param name="VirtualSize">Its guest-visible size in bytes; reads beyond it get zeroes.</param>
public sealed record QcowBackingLayer(int Depth, string FileName, string Format, long VirtualSize);
