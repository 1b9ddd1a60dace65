namespace QcowTier;

/// <summary>The virtual disk as a <see cref="Stream"/>; its position is its own, the image stays shared.</summary>
internal sealed class QcowStream : Stream
{
    private readonly QcowImage _image;
    private long _position;

    public QcowStream(QcowImage image) => _image = image;

    public override bool CanRead => true;

    public override bool CanSeek => true;

    public override bool CanWrite => !_image.IsReadOnly;

    public override long Length => _image.Size;

    public override long Position
    {
        get => _position;
        set
        {
            ArgumentOutOfRangeException.ThrowIfNegative(value);
            _position = value;
        }
    }

    public override void Flush() => _image.Flush();

    public override Task FlushAsync(CancellationToken cancellationToken) => _image.FlushAsync(cancellationToken).AsTask();

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    public override int Read(Span<byte> buffer)
    {
        var n = (int)Math.Clamp(_image.Size - _position, 0, buffer.Length);
        _image.Read(_position, buffer[..n]);
        _position += n;
        return n;
    }

    public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        var n = (int)Math.Clamp(_image.Size - _position, 0, buffer.Length);
        await _image.ReadAsync(_position, buffer[..n], cancellationToken).ConfigureAwait(false);
        _position += n;
        return n;
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken)
        => ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));

    public override void Write(ReadOnlySpan<byte> buffer)
    {
        if (_position + buffer.Length > _image.Size)
        {
            throw new IOException($"write of {buffer.Length} bytes at {_position} would pass the end of the {_image.Size}-byte virtual disk");
        }
        _image.Write(_position, buffer);
        _position += buffer.Length;
    }

    public override async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
    {
        if (_position + buffer.Length > _image.Size)
        {
            throw new IOException($"write of {buffer.Length} bytes at {_position} would pass the end of the {_image.Size}-byte virtual disk");
        }
        await _image.WriteAsync(_position, buffer, cancellationToken).ConfigureAwait(false);
        _position += buffer.Length;
    }

    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken)
        => WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override long Seek(long offset, SeekOrigin origin)
    {
        Position = origin switch
        {
            SeekOrigin.Begin => offset,
            SeekOrigin.Current => _position + offset,
            _ => _image.Size + offset,
        };
        return _position;
    }

    public override void SetLength(long value) => _image.Resize(value);
}
