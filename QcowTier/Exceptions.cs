namespace QcowTier;

/// <summary>Base class of every error QcowTier raises about an image.</summary>
public class QcowException : IOException
{
    /// <summary>Creates the exception.</summary>
    public QcowException() { }

    /// <summary>Creates the exception with a message.</summary>
    /// <param name="message">What went wrong.</param>
    public QcowException(string message) : base(message) { }

    /// <summary>Creates the exception with a message and an inner exception.</summary>
    /// <param name="message">What went wrong.</param>
    /// <param name="inner">The cause.</param>
    public QcowException(string message, Exception inner) : base(message, inner) { }
}

/// <summary>The image's on-disk content is not acceptable: it names the file, the byte offset and the field.</summary>
public class QcowFormatException : QcowException
{
    /// <summary>Creates the exception.</summary>
    public QcowFormatException() { }

    /// <summary>Creates the exception with a message.</summary>
    /// <param name="message">What went wrong.</param>
    public QcowFormatException(string message) : base(message) { }

    /// <summary>Creates the exception with a message and an inner exception.</summary>
    /// <param name="message">What went wrong.</param>
    /// <param name="inner">The cause.</param>
    public QcowFormatException(string message, Exception inner) : base(message, inner) { }

    /// <summary>Creates the exception naming where the problem is.</summary>
    /// <param name="message">What went wrong.</param>
    /// <param name="fileName">The file, or null when it has no name.</param>
    /// <param name="offset">The byte offset in the file, or -1 when not known.</param>
    /// <param name="field">The on-disk field, or null.</param>
    public QcowFormatException(string message, string? fileName, long offset, string? field)
        : base(Compose(message, fileName, offset, field))
    {
        FileName = fileName;
        Offset = offset;
        Field = field;
    }

    /// <summary>The file the problem was found in, when known.</summary>
    public string? FileName { get; }

    /// <summary>The byte offset of the problem in the file, or -1 when not known.</summary>
    public long Offset { get; } = -1;

    /// <summary>The on-disk field that is wrong, when known.</summary>
    public string? Field { get; }

    private static string Compose(string message, string? fileName, long offset, string? field)
    {
        var where = fileName ?? "image";
        if (offset >= 0)
        {
            where += $" at offset 0x{offset:x}";
        }
        if (field is not null)
        {
            where += $" ({field})";
        }
        return $"{where}: {message}";
    }
}

/// <summary>The image is damaged: a structure points outside the file, overlaps another, or breaks a rule of the format.</summary>
public sealed class QcowCorruptImageException : QcowFormatException
{
    /// <summary>Creates the exception.</summary>
    public QcowCorruptImageException() { }

    /// <summary>Creates the exception with a message.</summary>
    /// <param name="message">What went wrong.</param>
    public QcowCorruptImageException(string message) : base(message) { }

    /// <summary>Creates the exception with a message and an inner exception.</summary>
    /// <param name="message">What went wrong.</param>
    /// <param name="inner">The cause.</param>
    public QcowCorruptImageException(string message, Exception inner) : base(message, inner) { }

    /// <summary>Creates the exception naming where the damage is.</summary>
    /// <param name="message">What is wrong.</param>
    /// <param name="fileName">The file, or null.</param>
    /// <param name="offset">The byte offset, or -1.</param>
    /// <param name="field">The on-disk field, or null.</param>
    public QcowCorruptImageException(string message, string? fileName, long offset, string? field)
        : base(message, fileName, offset, field) { }
}

/// <summary>The image uses a feature this version of QcowTier does not implement; nothing was read wrongly.</summary>
public sealed class QcowUnsupportedFeatureException : QcowFormatException
{
    /// <summary>Creates the exception.</summary>
    public QcowUnsupportedFeatureException() { }

    /// <summary>Creates the exception with a message.</summary>
    /// <param name="message">What is not supported.</param>
    public QcowUnsupportedFeatureException(string message) : base(message) { }

    /// <summary>Creates the exception with a message and an inner exception.</summary>
    /// <param name="message">What is not supported.</param>
    /// <param name="inner">The cause.</param>
    public QcowUnsupportedFeatureException(string message, Exception inner) : base(message, inner) { }

    /// <summary>Creates the exception naming the feature and where it was found.</summary>
    /// <param name="message">What is not supported.</param>
    /// <param name="fileName">The file, or null.</param>
    /// <param name="offset">The byte offset, or -1.</param>
    /// <param name="field">The on-disk field, or null.</param>
    public QcowUnsupportedFeatureException(string message, string? fileName, long offset, string? field)
        : base(message, fileName, offset, field) { }
}
