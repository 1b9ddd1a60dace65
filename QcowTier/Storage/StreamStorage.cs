namespace QcowTier.Storage;

/// <summary>A seekable <see cref="Stream"/>; the stream's single position forces every request through one lock.</summary>
internal sealed class StreamStorage : ImageStorage
{
    private readonly Stream _stream;
    private readonly bool _leaveOpen;
    private readonly object _gate = new();

    public StreamStorage(Stream stream, string? name, bool leaveOpen)
    {
        if (!stream.CanSeek || !stream.CanRead)
        {
            throw new ArgumentException("the stream must be readable and seekable", nameof(stream));
        }
        _stream = stream;
        Name = name;
        _leaveOpen = leaveOpen;
    }

    public override string? Name { get; }

    public override long Length
    {
        get
        {
            lock (_gate)
            {
                return _stream.Length;
            }
        }
    }

    public override bool CanWrite => _stream.CanWrite;

    public override void Read(long offset, Span<byte> buffer)
    {
        lock (_gate)
        {
            var length = _stream.Length;
            var avail = (int)Math.Clamp(length - offset, 0, buffer.Length);
            if (avail > 0)
            {
                _stream.Position = offset;
                _stream.ReadExactly(buffer[..avail]);
            }
            buffer[avail..].Clear();
        }
    }

    public override void Write(long offset, ReadOnlySpan<byte> data)
    {
        lock (_gate)
        {
            _stream.Position = offset;
            _stream.Write(data);
        }
    }

    public override void Flush()
    {
        lock (_gate)
        {
            if (_stream is FileStream fs)
            {
                fs.Flush(flushToDisk: true);
            }
            else
            {
                _stream.Flush();
            }
        }
    }

    public override void SetLength(long length)
    {
        lock (_gate)
        {
            _stream.SetLength(length);
        }
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing && !_leaveOpen)
        {
            _stream.Dispose();
        }
    }
}
