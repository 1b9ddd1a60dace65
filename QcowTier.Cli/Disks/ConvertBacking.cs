using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Disks;

/// <summary>
/// convert -B: the output is an overlay whose backing file stands for the source's backing chain, so only the
/// source's top image is copied: its data, and its zero clusters as zeroes (they hide the backing file);
/// what it does not allocate stays unallocated. A raw source has no layers: all of it is copied.
/// </summary>
internal static class ConvertBacking
{
    public static void CopyTopLayer(Disk source, Disk target, int chunkSize, Progress progress)
    {
        var size = source.Size;
        var percentPerByte = size > 0 ? 100.0 / size : 0;
        using var buffer = new AlignedBuffer(chunkSize);
        IEnumerable<(long Start, long Length, bool Data, bool Zero)> runs = source is QcowDisk q
            ? q.Image.GetMap().Select(e => (e.Start, e.Length, e.Kind is QcowExtentKind.Data or QcowExtentKind.Compressed, e.Kind == QcowExtentKind.Zero))
            : [(0L, size, true, false)];
        foreach (var (start, length, data, zero) in runs)
        {
            if (zero)
            {
                target.WriteZeroes(start, length, mayUnmap: true);
            }
            else if (data)
            {
                for (long done = 0; done < length;)
                {
                    var n = (int)Math.Min(chunkSize, length - done);
                    var span = buffer.Memory.Span[..n];
                    source.Read(start + done, span);
                    target.Write(start + done, span);
                    done += n;
                }
            }
            progress.Advance(length * percentPerByte);
        }
    }
}
