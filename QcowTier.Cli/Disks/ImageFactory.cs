using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Disks;

/// <summary>Creates images as qemu-img create does: an existing file is replaced, sizes round up to 512 bytes.</summary>
internal static class ImageFactory
{
    public static long RoundSize(long size) => (size + 511) & ~511L;

    public static void CreateQcow(string path, long size, QcowCreateOptions options)
    {
        try
        {
            // Through a stream opened with truncation: qemu-img overwrites an existing file in place
            // (keeping its permissions and links), where the library's path overload wants a new file.
            using var stream = new FileStream(path, FileMode.Create, FileAccess.ReadWrite, FileShare.ReadWrite);
            using var image = QcowImage.Create(stream, RoundSize(size), options, leaveOpen: true);
            image.Flush();
            stream.Flush(flushToDisk: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CliException($"{path}: Could not create '{path}': {DiskOpener.Describe(e)}", e);
        }
    }

    public static void CreateRaw(string path, long size, string preallocation = "off")
    {
        size = RoundSize(size);
        try
        {
            using var h = File.OpenHandle(path, FileMode.Create, FileAccess.ReadWrite, FileShare.ReadWrite);
            RandomAccess.SetLength(h, size);
            switch (preallocation)
            {
                case "falloc":
                    if (!NativeFile.Allocate(h, 0, size))
                    {
                        WriteZeroes(h, size);
                    }
                    break;
                case "full":
                    WriteZeroes(h, size);
                    break;
                default:
                    // As file-posix: write the first block so that later probes of its alignment work, and
                    // so qemu-img map and info see the same layout on our files as on theirs.
                    if (size > 0)
                    {
                        var first = (int)Math.Min(size, size < 4096 ? 512 : 4096);
                        RandomAccess.Write(h, new byte[first], 0);
                    }
                    break;
            }
            RandomAccess.FlushToDisk(h);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CliException($"{path}: Could not create '{path}': {DiskOpener.Describe(e)}", e);
        }
    }

    private static void WriteZeroes(Microsoft.Win32.SafeHandles.SafeFileHandle h, long size)
    {
        var zero = new byte[1 << 20];
        for (long done = 0; done < size; done += zero.Length)
        {
            RandomAccess.Write(h, zero.AsSpan(0, (int)Math.Min(zero.Length, size - done)), done);
        }
    }
}
