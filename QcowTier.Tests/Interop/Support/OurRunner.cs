namespace QcowTier.Tests.Interop.Support;

/// <summary>Applies <see cref="Op"/>s to a QcowTier image through the sync, async or Stream API.</summary>
public sealed class OurRunner : IDisposable
{
    private readonly Func<QcowImage> _reopen;
    private readonly Api _api;
    private QcowImage _image;
    private Stream? _stream;

    public OurRunner(QcowImage image, Func<QcowImage> reopen, Api api)
    {
        _image = image;
        _reopen = reopen;
        _api = api;
        if (api == Api.Stream)
        {
            _stream = image.AsStream();
        }
    }

    public QcowImage Image => _image;

    public static OurRunner OpenFile(string path, Api api, QcowCacheMode cache = QcowCacheMode.Writeback)
    {
        var options = new QcowOpenOptions { CacheMode = cache };
        return new OurRunner(QcowImage.Open(path, options), () => QcowImage.Open(path, options), api);
    }

    public void ApplyAll(IEnumerable<Op> ops)
    {
        foreach (var op in ops)
        {
            Apply(op);
        }
    }

    public void Apply(Op op)
    {
        try
        {
            switch (_api)
            {
                case Api.Async:
                    ApplyAsync(op).AsTask().GetAwaiter().GetResult();
                    break;
                case Api.Stream:
                    ApplyStream(op);
                    break;
                default:
                    ApplySync(op);
                    break;
            }
        }
        catch (Exception e) when (e is not Xunit.Sdk.XunitException)
        {
            throw new InvalidOperationException($"{op} via {_api} failed: {e.Message}", e);
        }
    }

    private void ApplySync(Op op)
    {
        switch (op)
        {
            case WriteOp w: _image.Write(w.Offset, w.Data); break;
            case ZeroOp z: _image.WriteZeroes(z.Offset, z.Length, z.Unmap); break;
            case DiscardOp d: _image.Discard(d.Offset, d.Length); break;
            case ResizeOp r: _image.Resize(r.NewSize); break;
            case FlushOp: _image.Flush(); break;
            case ReopenOp: Reopen(); break;
            default: throw new ArgumentException(op.ToString(), nameof(op));
        }
    }

    private async ValueTask ApplyAsync(Op op)
    {
        switch (op)
        {
            case WriteOp w: await _image.WriteAsync(w.Offset, w.Data); break;
            case ZeroOp z: await _image.WriteZeroesAsync(z.Offset, z.Length, z.Unmap); break;
            case DiscardOp d: await _image.DiscardAsync(d.Offset, d.Length); break;
            case ResizeOp r: _image.Resize(r.NewSize); break;
            case FlushOp: await _image.FlushAsync(); break;
            case ReopenOp: await _image.DisposeAsync(); _image = _reopen(); break;
            default: throw new ArgumentException(op.ToString(), nameof(op));
        }
    }

    private void ApplyStream(Op op)
    {
        var s = _stream!;
        switch (op)
        {
            case WriteOp w:
                s.Seek(w.Offset, SeekOrigin.Begin);
                // Several small stream writes, as a file copy would do.
                var chunk = Math.Max(1, w.Data.Length / 3);
                for (var done = 0; done < w.Data.Length; done += chunk)
                {
                    s.Write(w.Data, done, Math.Min(chunk, w.Data.Length - done));
                }
                s.Position.Should().Be(w.Offset + w.Data.Length);
                break;
            case ResizeOp r:
                s.SetLength(r.NewSize);
                s.Length.Should().Be(r.NewSize);
                break;
            case FlushOp:
                s.Flush();
                break;
            case ReopenOp:
                Reopen();
                break;
            default:
                ApplySync(op);
                break;
        }
    }

    private void Reopen()
    {
        _stream?.Dispose();
        _image.Dispose();
        _image = _reopen();
        if (_api == Api.Stream)
        {
            _stream = _image.AsStream();
        }
    }

    /// <summary>The whole guest content, read through the runner's API.</summary>
    public byte[] ReadAll()
    {
        var size = _image.Size;
        var buf = new byte[size];
        switch (_api)
        {
            case Api.Async:
                // Uneven pieces so reads start and end mid-cluster.
                var pos = 0L;
                var piece = 100_003;
                while (pos < size)
                {
                    var n = (int)Math.Min(piece, size - pos);
                    _image.ReadAsync(pos, buf.AsMemory((int)pos, n)).AsTask().GetAwaiter().GetResult();
                    pos += n;
                }
                break;
            case Api.Stream:
                var s = _stream!;
                s.Seek(0, SeekOrigin.Begin);
                var total = 0;
                int got;
                while ((got = s.Read(buf, total, Math.Min(77_777, buf.Length - total))) > 0)
                {
                    total += got;
                }
                total.Should().Be(buf.Length);
                s.Read(new byte[16], 0, 16).Should().Be(0, "a read at the end of the disk returns nothing");
                break;
            default:
                _image.Read(0, buf);
                break;
        }
        return buf;
    }

    public void Dispose()
    {
        _stream?.Dispose();
        _image.Dispose();
    }
}

/// <summary>The expected guest content: a byte array to which the same operations are applied.</summary>
public sealed class ContentModel
{
    private readonly int _clusterSize;
    private byte[] _bytes;

    public ContentModel(long size, int clusterSize)
    {
        _bytes = new byte[size];
        _clusterSize = clusterSize;
    }

    public byte[] Bytes => _bytes;

    public ContentModel Clone()
    {
        var c = new ContentModel(0, _clusterSize);
        c._bytes = (byte[])_bytes.Clone();
        return c;
    }

    public long Size => _bytes.LongLength;

    public void Apply(Op op)
    {
        switch (op)
        {
            case WriteOp w:
                w.Data.CopyTo(_bytes.AsSpan((int)w.Offset));
                break;
            case ZeroOp z:
                _bytes.AsSpan((int)z.Offset, (int)z.Length).Clear();
                break;
            case DiscardOp d:
                {
                    // Whole clusters only; the partial cluster at the end of the disk counts as whole.
                    var cs = _clusterSize;
                    var start = (d.Offset + cs - 1) / cs * cs;
                    var end = d.Offset + d.Length == Size ? Size : (d.Offset + d.Length) / cs * cs;
                    if (end > start)
                    {
                        _bytes.AsSpan((int)start, (int)(end - start)).Clear();
                    }
                    break;
                }
            case ResizeOp r:
                Array.Resize(ref _bytes, (int)r.NewSize);
                break;
        }
    }

    public void ApplyAll(IEnumerable<Op> ops)
    {
        foreach (var op in ops)
        {
            Apply(op);
        }
    }
}
