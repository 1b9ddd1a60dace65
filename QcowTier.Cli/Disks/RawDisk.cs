using Microsoft.Win32.SafeHandles;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Disks;

/// <summary>
/// A plain file as a disk (QEMU's raw format over file-posix). The virtual size is the file length
/// rounded up to 512 bytes, as QEMU reports it; bytes past the end of the file read as zeroes.
/// </summary>
internal sealed class RawDisk : Disk
{
    private const int DirectAlignment = 4096;
    private readonly SafeFileHandle _handle;
    private readonly SafeFileHandle? _direct;
    private readonly bool _writable;

    public RawDisk(string path, bool writable, CacheMode cache) : base(path, cache)
    {
        _writable = writable;
        _handle = File.OpenHandle(path, FileMode.Open, writable ? FileAccess.ReadWrite : FileAccess.Read, FileShare.ReadWrite);
        if (cache.Direct)
        {
            try
            {
                _direct = NativeFile.OpenDirect(path, writable);
            }
            catch
            {
                _handle.Dispose();
                throw;
            }
        }
    }

    public override string Format => "raw";

    public long FileLength => RandomAccess.GetLength(_handle);

    public override long Size => (FileLength + 511) & ~511L;

    public override long AllocatedBytes => NativeFile.AllocatedBytes(_handle);

    internal SafeFileHandle Handle => _handle;

    /// <summary>The O_DIRECT handle when the request is aligned for it, else the buffered one.</summary>
    private unsafe SafeFileHandle HandleFor(long offset, ReadOnlySpan<byte> buffer)
    {
        if (_direct is null)
        {
            return _handle;
        }
        fixed (byte* p = buffer)
        {
            return ((offset | (long)buffer.Length | (long)(nint)p) & (DirectAlignment - 1)) == 0 ? _direct : _handle;
        }
    }

    public override void Read(long offset, Span<byte> buffer)
    {
        var h = HandleFor(offset, buffer);
        var done = 0;
        while (done < buffer.Length)
        {
            var n = RandomAccess.Read(h, buffer[done..], offset + done);
            if (n == 0)
            {
                buffer[done..].Clear();
                return;
            }
            done += n;
        }
    }

    public override async ValueTask ReadAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        var h = HandleFor(offset, buffer.Span);
        var done = 0;
        while (done < buffer.Length)
        {
            var n = await RandomAccess.ReadAsync(h, buffer[done..], offset + done, cancellationToken).ConfigureAwait(false);
            if (n == 0)
            {
                buffer.Span[done..].Clear();
                return;
            }
            done += n;
        }
    }

    protected override void WriteCore(long offset, ReadOnlySpan<byte> data)
        => RandomAccess.Write(HandleFor(offset, data), data, offset);

    protected override ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
        => RandomAccess.WriteAsync(HandleFor(offset, data.Span), data, offset, cancellationToken);

    public override void WriteZeroes(long offset, long length, bool mayUnmap)
    {
        // As file-posix: punch a hole when unmapping is allowed, else zero the range in place.
        var inFile = Math.Max(0, Math.Min(length, FileLength - offset));
        if (inFile > 0 && !(mayUnmap ? NativeFile.PunchHole(_handle, offset, inFile) : NativeFile.ZeroRange(_handle, offset, inFile)))
        {
            WriteZeroBuffer(offset, inFile);
        }
        if (Cache.WriteThrough)
        {
            Flush();
        }
    }

    private void WriteZeroBuffer(long offset, long length)
    {
        var zero = new byte[(int)Math.Min(length, 1 << 20)];
        for (long done = 0; done < length; done += zero.Length)
        {
            var n = (int)Math.Min(zero.Length, length - done);
            RandomAccess.Write(_handle, zero.AsSpan(0, n), offset + done);
        }
    }

    public override void Discard(long offset, long length)
    {
        var inFile = Math.Max(0, Math.Min(length, FileLength - offset));
        if (inFile > 0)
        {
            NativeFile.PunchHole(_handle, offset, inFile);
        }
    }

    protected override void FlushCore()
    {
        if (_writable)
        {
            RandomAccess.FlushToDisk(_handle);
        }
    }

    protected override ValueTask FlushCoreAsync() => new(Task.Run(FlushCore));

    public override void Resize(long newSize) => RandomAccess.SetLength(_handle, newSize);

    public override IEnumerable<BlockStatus> GetStatus(long offset, long length)
    {
        var end = offset + length;
        var fileLength = FileLength;
        while (offset < end)
        {
            var found = NativeFile.FindAllocation(_handle, offset, fileLength);
            var data = found?.Data ?? true;
            var runEnd = found is null ? end : Math.Min(end, found.Value.End);
            yield return new BlockStatus(offset, runEnd - offset, Present: true, Zero: !data, Data: data, Offset: offset);
            offset = runEnd;
        }
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _direct?.Dispose();
            _handle.Dispose();
        }
    }
}
