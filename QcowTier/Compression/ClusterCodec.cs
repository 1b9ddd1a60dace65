using System.Collections.Concurrent;
using System.IO.Compression;
using ZstdSharp;
using ZstdSharp.Unsafe;

namespace QcowTier.Compression;

/// <summary>
/// Compresses and decompresses whole clusters the way QEMU's qcow2-threads.c does: the compressed form
/// must fit in less than a cluster or the cluster is stored uncompressed, and decompression must yield
/// exactly one cluster from input that may carry trailing bytes (the rest of the last sector, or the
/// next compressed cluster). Instances are thread-safe.
/// </summary>
internal abstract class ClusterCodec
{
    /// <summary>compression_type 0 (header offset 104).</summary>
    public const byte TypeZlib = 0;

    /// <summary>compression_type 1.</summary>
    public const byte TypeZstd = 1;

    public static ClusterCodec For(byte type) => type == TypeZstd ? ZstdCodec.Instance : ZlibCodec.Instance;

    public static bool IsKnown(byte type) => type is TypeZlib or TypeZstd;

    /// <summary>Compresses <paramref name="source"/> into <paramref name="destination"/>.</summary>
    /// <returns>The compressed length, or -1 when it does not fit.</returns>
    public abstract int Compress(ReadOnlySpan<byte> source, Span<byte> destination);

    /// <summary>Fills <paramref name="destination"/> exactly; bytes of <paramref name="source"/> past the stream are ignored.</summary>
    /// <exception cref="InvalidDataException">The stream is damaged or ends before the destination is full.</exception>
    public abstract void Decompress(ReadOnlySpan<byte> source, Span<byte> destination);
}

/// <summary>
/// Raw deflate (no zlib header), as QEMU writes it. QEMU compresses with a 4 KiB window (windowBits -12);
/// the BCL encoder uses up to 32 KiB, which QEMU (and any reader inflating a cluster in one call into a
/// cluster-sized buffer) resolves from the output buffer: verified against qemu-img and qemu-io.
/// </summary>
internal sealed class ZlibCodec : ClusterCodec
{
    public static readonly ZlibCodec Instance = new();

    public override int Compress(ReadOnlySpan<byte> source, Span<byte> destination)
    {
        var sink = new BoundedSink(destination.Length);
        // Level 6, zlib's default, as QEMU (Z_DEFAULT_COMPRESSION).
        using (var deflate = new DeflateStream(sink, CompressionLevel.Optimal, leaveOpen: true))
        {
            deflate.Write(source);
        }
        if (sink.Overflowed)
        {
            sink.Return();
            return -1;
        }
        try
        {
            sink.Written.CopyTo(destination);
            return sink.Written.Length;
        }
        finally
        {
            sink.Return();
        }
    }

    /// <summary>
    /// Collects the encoder's output up to a limit and notes an overflow instead of throwing, so the
    /// encoder is always disposed normally (its native state released at once).
    /// </summary>
    private sealed class BoundedSink(int capacity) : Stream
    {
        private readonly byte[] _buffer = System.Buffers.ArrayPool<byte>.Shared.Rent(capacity);
        private int _length;

        public bool Overflowed { get; private set; }

        public ReadOnlySpan<byte> Written => _buffer.AsSpan(0, _length);

        public override bool CanRead => false;

        public override bool CanSeek => false;

        public override bool CanWrite => true;

        public override long Length => _length;

        public override long Position { get => _length; set => throw new NotSupportedException(); }

        public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));

        public override void Write(ReadOnlySpan<byte> buffer)
        {
            if (Overflowed || buffer.Length > capacity - _length)
            {
                Overflowed = true;
                return;
            }
            buffer.CopyTo(_buffer.AsSpan(_length));
            _length += buffer.Length;
        }

        public override void Flush()
        {
        }

        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();

        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

        public override void SetLength(long value) => throw new NotSupportedException();

        public void Return() => System.Buffers.ArrayPool<byte>.Shared.Return(_buffer);
    }

    public override unsafe void Decompress(ReadOnlySpan<byte> source, Span<byte> destination)
    {
        fixed (byte* p = source)
        {
            using var input = new UnmanagedMemoryStream(p, source.Length);
            using var inflate = new DeflateStream(input, CompressionMode.Decompress);
            // Reads stop once the cluster is full: a stream claiming more output (a bomb) costs at most one cluster.
            var n = inflate.ReadAtLeast(destination, destination.Length, throwOnEndOfStream: false);
            if (n != destination.Length)
            {
                throw new InvalidDataException($"the deflate stream ends after {n} of {destination.Length} bytes");
            }
        }
    }
}

/// <summary>
/// zstd frames, as QEMU writes them (one frame per cluster, default level 3). Decoding follows QEMU: the
/// input may hold several frames, decoding stops when the cluster is full, and the last frame must end there.
/// </summary>
internal sealed class ZstdCodec : ClusterCodec
{
    public static readonly ZstdCodec Instance = new();

    /// <summary>Windows above 4 MiB are refused: a hostile frame header cannot make us allocate more.</summary>
    private const int MaxWindowLog = 22;

    private readonly ConcurrentBag<Compressor> _compressors = [];
    private readonly ConcurrentBag<DecoderContext> _decompressors = [];

    public override int Compress(ReadOnlySpan<byte> source, Span<byte> destination)
    {
        if (!_compressors.TryTake(out var c))
        {
            c = new Compressor(3);
        }
        try
        {
            return c.TryWrap(source, destination, out var written) ? written : -1;
        }
        catch (ZstdException)
        {
            c.Dispose();
            c = new Compressor(3);
            return -1;
        }
        finally
        {
            _compressors.Add(c);
        }
    }

    public override unsafe void Decompress(ReadOnlySpan<byte> source, Span<byte> destination)
    {
        // The low-level streaming call, as QEMU makes it: its return value tells whether the frame ended
        // exactly where the cluster did (0), which the Decompressor wrapper does not pass on.
        if (!_decompressors.TryTake(out var d))
        {
            d = new DecoderContext();
        }
        var reusable = false;
        try
        {
            var ctx = d.Context;
            Methods.ZSTD_DCtx_reset(ctx, ZSTD_ResetDirective.ZSTD_reset_session_only);
            fixed (byte* pin = source)
            fixed (byte* pout = destination)
            {
                var input = new ZSTD_inBuffer_s { src = pin, size = (nuint)source.Length, pos = 0 };
                var output = new ZSTD_outBuffer_s { dst = pout, size = (nuint)destination.Length, pos = 0 };
                nuint ret = 1;
                while (output.pos < output.size)
                {
                    var lastIn = input.pos;
                    var lastOut = output.pos;
                    ret = Methods.ZSTD_decompressStream(ctx, &output, &input);
                    if (Methods.ZSTD_isError(ret))
                    {
                        throw new InvalidDataException("damaged zstd data: " + Methods.ZSTD_getErrorName(ret));
                    }
                    if (input.pos <= lastIn && output.pos <= lastOut)
                    {
                        // No progress: the input ran out before the cluster was full.
                        throw new InvalidDataException($"the zstd data ends after {output.pos} of {output.size} bytes");
                    }
                }
                if (ret != 0)
                {
                    // The frame goes on past a full cluster: damaged, as QEMU judges it.
                    throw new InvalidDataException("the zstd frame decodes to more than one cluster");
                }
            }
            reusable = true;
        }
        finally
        {
            if (reusable)
            {
                _decompressors.Add(d);
            }
            else
            {
                d.Dispose();
            }
        }
    }

    /// <summary>A zstd decoding context (native-style memory owned by the port), freed on dispose or finalization.</summary>
    private sealed unsafe class DecoderContext : IDisposable
    {
        public DecoderContext()
        {
            Context = Methods.ZSTD_createDCtx();
            if (Context == null)
            {
                throw new InvalidOperationException("cannot create a zstd decoding context");
            }
            Methods.ZSTD_DCtx_setParameter(Context, ZSTD_dParameter.ZSTD_d_windowLogMax, MaxWindowLog);
        }

        public ZSTD_DCtx_s* Context { get; private set; }

        public void Dispose()
        {
            Free();
            GC.SuppressFinalize(this);
        }

        ~DecoderContext() => Free();

        private void Free()
        {
            if (Context != null)
            {
                Methods.ZSTD_freeDCtx(Context);
                Context = null;
            }
        }
    }
}
