using System.Diagnostics.CodeAnalysis;

namespace QcowTier;

/// <summary>Cold throw paths, kept out of the hot methods so they stay small enough to inline.</summary>
internal static class ThrowHelper
{
    [DoesNotReturn]
    public static void Corrupt(string? file, long offset, string field, string message)
        => throw new QcowCorruptImageException(message, file, offset, field);

    [DoesNotReturn]
    public static T Corrupt<T>(string? file, long offset, string field, string message)
        => throw new QcowCorruptImageException(message, file, offset, field);

    [DoesNotReturn]
    public static void Unsupported(string? file, long offset, string? field, string message)
        => throw new QcowUnsupportedFeatureException(message, file, offset, field);

    [DoesNotReturn]
    public static void Format(string? file, long offset, string? field, string message)
        => throw new QcowFormatException(message, file, offset, field);

    [DoesNotReturn]
    public static void ReadOnly(string? file)
        => throw new InvalidOperationException($"{file ?? "image"}: the image is open read-only");

    [DoesNotReturn]
    public static void OutOfRange(string paramName, long offset, long length, long size)
        => throw new ArgumentOutOfRangeException(paramName, $"request [{offset}, +{length}) lies outside the virtual disk of {size} bytes");

    [DoesNotReturn]
    public static void Disposed(string? file)
        => throw new ObjectDisposedException(file ?? nameof(QcowImage));
}
