using Microsoft.Win32.SafeHandles;

namespace QcowTier.Cli.Disks;

/// <summary>
/// A positional file stream whose flush stops at the page cache (QEMU's cache=unsafe). Not a
/// FileStream subclass: a derived FileStream routes span writes through a pooled array copy.
/// </summary>
internal sealed class UnsyncedFileStream : Stream
{
    private readonly SafeFileHandle _handle;
    private long _position;

    public UnsyncedFileStream(string path)
        => _handle = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite);

    public override bool CanRead => true;

    public override bool CanSeek => true;

    public override bool CanWrite => true;

    public override long Length => RandomAccess.GetLength(_handle);

    public override long Position
    {
        get => _position;
        set => _position = value;
    }

    public override int Read(Span<byte> buffer)
    {
        var n = RandomAccess.Read(_handle, buffer, _position);
        _position += n;
        return n;
    }

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    public override void Write(ReadOnlySpan<byte> buffer)
    {
        RandomAccess.Write(_handle, buffer, _position);
        _position += buffer.Length;
    }

    public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));

    public override long Seek(long offset, SeekOrigin origin) => _position = origin switch
    {
        SeekOrigin.Begin => offset,
        SeekOrigin.Current => _position + offset,
        _ => Length + offset,
    };

    public override void SetLength(long value) => RandomAccess.SetLength(_handle, value);

    /// <summary>Deliberately nothing: with cache=unsafe, data reaches the disk when the kernel writes it back.</summary>
    public override void Flush()
    {
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _handle.Dispose();
        }
        base.Dispose(disposing);
    }
}
